"""What every serving instance shares, whatever its role: the engine loop thread, the actor and worker bases,
and the typed messages the router exchanges with the role actors."""

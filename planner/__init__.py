"""Capacity planning for the P/D split: profile an engine, predict the goodput of every split."""

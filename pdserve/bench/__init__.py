"""`pdserve bench`: load generation and trace replay against a router, with TTFT/TPOT/goodput reports."""

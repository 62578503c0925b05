"""The simulation and benchmark harness: simulated users who vote with a judge (simulate.py, judges.py)
and the loop benchmark that runs the service and the trainer on their votes (loop.py, evaluate.py).

It drives the service from outside, as people and operators do; nothing in services/ or trainer/
imports it (the trainer learns from votes only).
"""

"""Designers under load, and faults under that load, on the real studio and its local endpoint:
`python -m bench.load` (see its __main__ for the options); one file a job: studio_tree (the studio
and its processes), designers, faults, run, report."""

"""Programs the tests run as subprocesses (kills, faults, other interpreters); each takes its inputs as argv.

They run with the repository on PYTHONPATH (``tests.helpers.SUB_ENV``) and only *pause* or *limit* a real
component at a chosen point (:mod:`tests.scripts.faults`); they never replace one.
"""

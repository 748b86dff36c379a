"""Beam jobs and the command line: planning, the job graph, finalize, reports."""

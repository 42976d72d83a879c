"""An agent's lifecycle: what shows it does its job before and while it serves.

- :mod:`serve.lifecycle.evals`: an agent's eval suite (``agents/<name>/evals.yaml``):
  task, safety and paired bias cases and the thresholds they must reach;
- :mod:`serve.lifecycle.checks`: each case's expectations against what the fleet did
  (the answer, and the request's explanation: tools, delegations, decisions, cost);
- :mod:`serve.lifecycle.runner`: ``fleet eval``: the suites run against a fleet over its
  OpenAI API, with progress, a summary, JSON and JUnit results.
"""

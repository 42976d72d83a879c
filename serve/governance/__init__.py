"""Governance above the rule library: the governor (decide, fail closed, shadow, audit), the agent guard, decision types, the config."""

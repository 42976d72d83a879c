# May the agent see what a tool returned? Its data classes, then PII per the agent's mode.
package fleet.data

import rego.v1

missing := {c | some c in input.action.classes; not c in input.agent.data}

decision := {"outcome": "deny", "reasons": [sprintf("data classes %v are not granted to %v", [sort([c | some c in missing]), input.agent.name])]} if {
	count(missing) > 0
} else := {"outcome": "redact", "reasons": ["PII in a result the agent may not see as PII"]} if {
	count(input.action.pii) > 0
	not "pii" in input.agent.data
} else := data.fleet.lib.pii_decision

# May this principal call this agent? Roles map to agents in access.yaml (data.config.roles).
package fleet.ingress

import rego.v1

default decision := {"outcome": "deny", "reasons": ["no role of the principal may call this agent"]}

# One decision however many of the principal's roles may call it (each its own would conflict).
decision := {"outcome": "allow", "reasons": [concat("", ["role ", who, " may call ", input.action.agent])]} if {
	count(callers) > 0
}

callers contains role if {
	some role in input.principal.roles
	role_may_call(role, input.action.agent)
}

who := concat(",", sort([r | some r in callers]))

# Shared with delegation.rego: a role reaches the same agents directly or by delegation.
may_call(agent) if {
	some role in input.principal.roles
	role_may_call(role, agent)
}

role_may_call(role, agent) if {
	some allowed in object.get(data.config.roles, role, [])
	allowed in {"*", agent}
}

# May this principal call this agent? Roles map to agents in access.yaml (data.config.roles).
package fleet.ingress

import rego.v1

default decision := {"outcome": "deny", "reasons": ["no role of the principal may call this agent"]}

decision := {"outcome": "allow", "reasons": [sprintf("role %v may call %v", [role, input.action.agent])]} if {
	some role in input.principal.roles
	allowed := object.get(data.config.roles, role, [])
	some agent in allowed
	agent in {"*", input.action.agent}
}

# Who may approve, reject or look at a call of an agent that waits for a person?
# input.action: operation (approve | reject | view), approval, tool, requester,
# requester_tenant, decider; input.principal is who decides (or looks), input.agent the
# agent whose call waits. By default a role `approver` (every agent's), `approver:<agent>`
# or one that data.config.approvals.roles lists for the agent may decide; role `admin`
# may look. Never the requester: the approvals service refuses that whatever this says.
package fleet.approval

import rego.v1

default decision := {"outcome": "deny", "reasons": ["no rule lets this principal decide"]}

decision := {"outcome": "deny", "reasons": ["separation of duties: who made the request may not decide on it"]} if {
	input.action.operation != "view"
	input.action.requester == input.action.decider
} else := {"outcome": "allow", "reasons": [concat("", ["role ", who, " may decide on approvals of ", input.agent.name])]} if {
	count(deciding) > 0
} else := {"outcome": "allow", "reasons": ["role admin may look at approvals"]} if {
	input.action.operation == "view"
	"admin" in input.principal.roles
} else := {"outcome": "deny", "reasons": [concat("", ["no role of this principal may decide on approvals of ", input.agent.name])]}

who := concat(",", sort([r | some r in deciding]))

deciding contains role if {
	input.principal.authenticated
	some role in input.principal.roles
	role in approver_roles
}

approver_roles := {"approver", concat("", ["approver:", input.agent.name])} | {r | some r in object.get(data.config, ["approvals", "roles", input.agent.name], [])}

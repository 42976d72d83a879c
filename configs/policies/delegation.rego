# May the agent hand a task to another? Only to a declared delegate, never back up the
# chain, and only to an agent the caller's roles may use (access.yaml, as at the ingress).
package fleet.delegation

import rego.v1

default decision := {"outcome": "allow", "reasons": ["declared delegate"]}

decision := {"outcome": "deny", "reasons": [sprintf("%v is not a delegate of %v", [input.action.target, input.agent.name])]} if {
	not input.action.target in input.agent.delegates
} else := {"outcome": "deny", "reasons": [sprintf("%v is already in the call chain", [input.action.target])]} if {
	input.action.target in input.request.chain
} else := {"outcome": "deny", "reasons": [sprintf("no role of the principal may use %v", [input.action.target])]} if {
	not data.fleet.ingress.may_call(input.action.target)
}

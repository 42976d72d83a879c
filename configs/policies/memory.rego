# May the agent read or write this memory? The request tree's own shared context and
# artifacts: yes (the tree is one piece of work). Long-term facts: only a namespace the
# agent holds the scope for, memory:<namespace>:read or memory:<namespace>:write, after
# narrowing by its caller and the API key. Tenants never meet: every key starts with one.
package fleet.memory

import rego.v1

default decision := {"outcome": "deny", "reasons": ["unknown memory store"]}

decision := {"outcome": "allow", "reasons": ["the request's own shared context"]} if {
	input.action.store in {"context", "artifacts"}
	input.action.operation in {"read", "write"}
}

decision := {"outcome": "allow", "reasons": [sprintf("scope %v held", [needed])]} if {
	input.action.store == "facts"
	needed in input.agent.scopes
}

decision := {"outcome": "deny", "reasons": [sprintf("scope %v is not granted to %v", [needed, input.agent.name])]} if {
	input.action.store == "facts"
	not needed in input.agent.scopes
}

needed := sprintf("memory:%v:%v", [input.action.namespace, input.action.operation])

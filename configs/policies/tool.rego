# May the agent run this tool with these arguments?
package fleet.tool

import rego.v1

default decision := {"outcome": "allow", "reasons": ["tool scope held"]}

# Order matters: a missing scope denies even a tool that needs approval.
decision := {"outcome": "deny", "reasons": [sprintf("%v is not a tool of %v", [input.action.tool, input.agent.name])]} if {
	not input.action.known
} else := {"outcome": "deny", "reasons": [sprintf("scope %v is not granted to %v", [input.action.scope, input.agent.name])]} if {
	not input.action.scope in input.agent.scopes
} else := {"outcome": "deny", "reasons": sort([v | some v in violations])} if {
	count(violations) > 0
} else := {"outcome": "escalate", "reasons": ["the tool needs human approval"]} if {
	input.action.approval
}

# Argument constraints from access.yaml: tools.<tool>.<argument>.{max, min, pattern}.
rules := object.get(data.config.tools, input.action.tool, {})

violations contains sprintf("argument %v exceeds %v", [arg, rule.max]) if {
	some arg, rule in rules
	input.action.arguments[arg] > rule.max
}

violations contains sprintf("argument %v is below %v", [arg, rule.min]) if {
	some arg, rule in rules
	input.action.arguments[arg] < rule.min
}

violations contains sprintf("argument %v must be a number", [arg]) if {
	some arg, rule in rules
	bounded(rule)
	value := input.action.arguments[arg]
	not is_number(value)
}

bounded(rule) if rule.max
bounded(rule) if rule.min

violations contains sprintf("argument %v does not match %v", [arg, rule.pattern]) if {
	some arg, rule in rules
	not regex.match(rule.pattern, sprintf("%v", [input.action.arguments[arg]]))
}

# May a model call overdraw a budget? Asked only when its worst case does not fit what a
# budget has left (input.action: budget, amount, left, limit, in USD as decimal strings):
# the refusal is a decision, audited like every other. By default nobody overdraws; a
# role in data.config.budgets.overdraw_roles may overdraw a day's or a month's budget
# (tenant:, key:, agent:), never a request's own cap (it stops a runaway loop).
package fleet.budget

import rego.v1

default decision := {"outcome": "deny", "reasons": ["no rule lets this call overdraw"]}

decision := {"outcome": "deny", "reasons": [refused]} if count(overdrawing) == 0

decision := {"outcome": "allow", "reasons": [concat("", ["role ", who, " may overdraw ", input.action.budget])]} if {
	count(overdrawing) > 0
}

who := concat(",", sort([r | some r in overdrawing]))

refused := sprintf("the %v budget of %v USD has %v USD left, less than this call's worst case of %v USD", [input.action.budget, input.action.limit, input.action.left, input.action.amount])

overdrawing contains role if {
	not startswith(input.action.budget, "request:")
	some role in input.principal.roles
	role in object.get(data.config, ["budgets", "overdraw_roles"], [])
}

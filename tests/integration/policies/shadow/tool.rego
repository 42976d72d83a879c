# A candidate tool policy rolled out in shadow mode: it would forbid multiply.
package fleet.tool

import rego.v1

default decision := {"outcome": "allow", "reasons": ["v2: allowed"]}

decision := {"outcome": "deny", "reasons": ["v2: multiply is retired"]} if input.action.tool == "multiply"

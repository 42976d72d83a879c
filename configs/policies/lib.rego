# Shared rules. PII handling: the manifest's mode, made stricter by compliance tags.
package fleet.lib

import rego.v1

strict_tags := {"gdpr", "hipaa", "pci"}

# The PII mode in force: "allow" becomes "redact" under a strict compliance tag.
pii_mode := "redact" if {
	input.agent.pii == "allow"
	some tag in input.agent.compliance
	tag in strict_tags
}

pii_mode := input.agent.pii if {
	not input.agent.pii == "allow"
}

pii_mode := "allow" if {
	input.agent.pii == "allow"
	not any_strict
}

any_strict if {
	some tag in input.agent.compliance
	tag in strict_tags
}

# PCI: payment cards are never shown, whatever the mode.
forced_kinds contains "card" if "pci" in input.agent.compliance

found := {kind | some kind in input.action.pii}

pii_decision := {"outcome": "allow", "reasons": []} if count(found) == 0

pii_decision := {"outcome": "allow", "reasons": [sprintf("PII allowed by manifest: %v", [sorted_found])]} if {
	count(found) > 0
	pii_mode == "allow"
	count(found & forced_kinds) == 0
}

pii_decision := {"outcome": "redact", "reasons": [sprintf("PII redacted: %v", [sorted_found])]} if {
	count(found) > 0
	pii_mode != "block"
	not allow_all
}

pii_decision := {"outcome": "deny", "reasons": [sprintf("PII blocked by manifest: %v", [sorted_found])]} if {
	count(found) > 0
	pii_mode == "block"
}

allow_all if {
	pii_mode == "allow"
	count(found & forced_kinds) == 0
}

sorted_found := sort([k | some k in found])

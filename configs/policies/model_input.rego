# What the model may read: PII in client messages, per the agent's PII mode.
package fleet.model_input

import rego.v1

decision := data.fleet.lib.pii_decision

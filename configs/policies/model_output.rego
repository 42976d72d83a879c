# What the model may say: PII in its answer, per the agent's PII mode.
package fleet.model_output

import rego.v1

decision := data.fleet.lib.pii_decision

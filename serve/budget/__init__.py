"""Cost and budgets: what a model call costs (:mod:`.price`) and what a request may still
spend (:mod:`.purse`). The cluster-wide ledger (tenants, keys, agents per day and month)
comes next, in this room, as a store, a one-writer service and a client."""

from serve.budget.price import Price, prompt_bound
from serve.budget.purse import Hold, Purse

__all__ = ["Hold", "Price", "Purse", "prompt_bound"]

"""Human approval of gated calls: a turn parks durably, people decide, it resumes exactly once.

Three parts, as every stateful service: the store (:mod:`.store`, SQLite), the one-writer
service deployment (:mod:`.service`) and the replica-side client (:mod:`.client`).
"""

from serve.approvals.config import ApprovalsConfig

__all__ = ["ApprovalsConfig"]

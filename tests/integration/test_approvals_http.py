"""Human approval over HTTP, on the real cluster (scripted model): a gated call parks its
turn, people decide through /v1/approvals, the turn resumes on any replica, the tool runs
exactly once, and every step is in the audit log and the explanation.

The tester agent's ``transfer`` (approval: true, expires after 600 s) and ``stall_transfer``
tools, and the helper's ``file_ticket``, write one line per run to ``fleet.runs``: the runs
are counted there, not guessed from answers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from serve.audit.log import audit_key, verify
from serve.testing import CANARY_EMAIL, wait_until
from tests.integration.conftest import APPROVER_KEY, BIN, QA2_KEY, QA_APPROVER_KEY, QA_KEY, Fleet

APP = "fleet-test"


def runs(fleet: Fleet, tool: str, **match: Any) -> list[dict[str, Any]]:
    assert fleet.runs is not None
    if not fleet.runs.exists():
        return []
    lines = [json.loads(x) for x in fleet.runs.read_text().splitlines() if x.strip()]
    return [x for x in lines if x["tool"] == tool and all(x.get(k) == v for k, v in match.items())]


def ask(fleet: Fleet, text: str, key: str = QA_KEY) -> httpx.Response:
    with fleet.client(fleet.test_url, key) as client:
        return client.post(
            "/v1/chat/completions", json={"model": "tester", "messages": [{"role": "user", "content": text}]}
        )


def approvals(fleet: Fleet, key: str = APPROVER_KEY) -> httpx.Client:
    return fleet.client(fleet.test_url, key)


def parked(fleet: Fleet, text: str, key: str = QA_KEY) -> dict[str, Any]:
    """A request that parks: its answer, with the approval it waits for."""
    answer = ask(fleet, text, key)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["fleet"]["approval"]["status"] == "pending", body
    return body


def decide(fleet: Fleet, approval_id: str, verb: str, key: str = APPROVER_KEY, **body: Any) -> httpx.Response:
    with approvals(fleet, key) as client:
        return client.post(f"/v1/approvals/{approval_id}/{verb}", json=body)


def finished(fleet: Fleet, approval_id: str, key: str = APPROVER_KEY, wait: float = 30) -> dict[str, Any]:
    """The approval once its request has an answer (long-polled, then polled)."""
    with approvals(fleet, key) as client:

        def done() -> dict[str, Any] | None:
            got = client.get(f"/v1/approvals/{approval_id}", params={"wait": 10})
            assert got.status_code == 200, got.text
            return got.json() if got.json()["result"] is not None else None

        return wait_until(done, timeout_s=wait, interval_s=0.2)


def answer_of(approval: dict[str, Any]) -> str:
    content: str = approval["result"]["completion"]["choices"][0]["message"]["content"]
    return content


def handle(name: str) -> Any:
    from ray import serve as rayserve

    return rayserve.get_deployment_handle(name, app_name=APP)


def _replicas(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def kill_all(deployment: str) -> None:
    """Kill every replica of a deployment; Serve starts new ones."""
    import ray

    victims = _replicas(deployment)
    assert victims, deployment
    for name in victims:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    wait_until(lambda: not set(victims) & set(_replicas(deployment)), timeout_s=30, interval_s=0.1)
    wait_until(lambda: _running(deployment), timeout_s=120, interval_s=0.5)


def _running(deployment: str) -> bool:
    from ray import serve as rayserve

    status = rayserve.status().applications[APP].deployments[deployment]
    return status.status == "HEALTHY" and bool(_replicas(deployment))


def needs_own_cluster(fleet: Fleet) -> None:
    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver kills replicas and moves clocks)")


def test_a_parked_turn_resumes_on_new_replicas_after_approval_and_runs_its_tool_once(fleet: Fleet) -> None:
    needs_own_cluster(fleet)
    client = openai.OpenAI(base_url=fleet.test_url + "/v1", api_key=QA_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tester", messages=[{"role": "user", "content": "#transfer 5"}]
    )
    completion = raw.parse()  # a strict OpenAI client reads it as any completion
    assert completion.choices[0].finish_reason == "stop"
    text = completion.choices[0].message.content or ""
    assert text.startswith("Moving it. The action (transfer) awaits approval"), text
    extra = completion.model_extra or {}
    pending = extra["fleet"]["approval"]
    assert set(pending) == {"id", "status", "agent", "tool", "expires_at"}
    assert (pending["status"], pending["agent"], pending["tool"]) == ("pending", "tester", "transfer")
    assert raw.headers["x-fleet-approval-id"] == pending["id"] and pending["id"] in text
    request_id = extra["fleet"]["request_id"]
    assert not runs(fleet, "transfer", amount=5)

    with approvals(fleet) as inbox:
        listed = inbox.get("/v1/approvals", params={"status": "pending", "agent": "tester"}).json()["data"]
    item = next(a for a in listed if a["id"] == pending["id"])
    assert item["arguments"]["amount"] == 5 and CANARY_EMAIL not in json.dumps(item)  # redacted for approvers
    assert item["requester"].startswith("qa:") and item["request_id"] == request_id

    # Every replica that could have parked it goes, and the approvals service's replica too.
    kill_all("tester")
    kill_all("approvals")
    approved = decide(fleet, pending["id"], "approve", reason="checked with finance")
    assert approved.status_code == 200, approved.text
    assert approved.json()["decision"]["outcome"] == "approved"
    done = finished(fleet, pending["id"])
    assert done["status"] == "completed"
    assert answer_of(done) == "Moving it.transfer said: moved 5"
    assert done["result"]["completion"]["fleet"]["request_id"] == request_id
    assert len(runs(fleet, "transfer", amount=5)) == 1

    # Asked again and again, it stays done: nothing runs a second time.
    again = decide(fleet, pending["id"], "approve")
    assert again.status_code == 409 and again.json()["error"]["param"] == "approval_id"
    time.sleep(3)  # past a re-dispatch interval of the service
    assert len(runs(fleet, "transfer", amount=5)) == 1

    # The audit log verifies, and the request's explanation tells the whole story.
    report = verify(fleet.audit_log, audit_key(fleet.audit_log))
    assert report.ok, report
    with fleet.client(fleet.test_url, QA_KEY) as qa:
        story = qa.get(f"/v1/requests/{request_id}/explain").json()
    events = [a["event"] for a in story["approvals"] if a["approval_id"] == pending["id"]]
    assert events == ["requested", "approved", "resumed", "ran", "completed"], events
    decided = next(a for a in story["approvals"] if a["event"] == "approved")
    assert decided["by"].startswith("ops:") and decided["detail"] == "checked with finance"
    assert [t["status"] for t in story["tool_calls"] if t["tool"] == "transfer"] == ["escalated", "ok"]
    assert any(d["point"] == "tool" and d["outcome"] == "escalate" for d in story["decisions"])


def test_one_of_a_concurrent_approve_and_reject_wins_the_other_gets_409(fleet: Fleet) -> None:
    approval = parked(fleet, "#transfer 6")["fleet"]["approval"]
    results: dict[str, httpx.Response] = {}
    start = threading.Barrier(2)

    def go(verb: str) -> None:
        start.wait()
        results[verb] = decide(fleet, approval["id"], verb)

    threads = [threading.Thread(target=go, args=(v,)) for v in ("approve", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results.values())
    assert codes == [200, 409], {v: r.text for v, r in results.items()}
    winner = next(v for v, r in results.items() if r.status_code == 200)
    done = finished(fleet, approval["id"])
    if winner == "approve":
        assert answer_of(done) == "Moving it.transfer said: moved 6"
        assert len(runs(fleet, "transfer", amount=6)) == 1
    else:
        assert done["status"] == "rejected" and "was rejected by ops:" in answer_of(done)
        assert not runs(fleet, "transfer", amount=6)


def test_who_may_decide_is_policy_and_never_the_requester(fleet: Fleet) -> None:
    mine = parked(fleet, "#transfer 11", key=QA_APPROVER_KEY)["fleet"]["approval"]
    own = decide(fleet, mine["id"], "approve", key=QA_APPROVER_KEY)
    assert own.status_code == 403, own.text
    assert "separation of duties" in own.json()["error"]["message"] and own.json()["error"]["decision_id"]
    wrong = decide(fleet, mine["id"], "approve", key=QA2_KEY)  # role qa: not an approver
    assert wrong.status_code == 403 and "no role of this principal" in wrong.json()["error"]["message"]
    with approvals(fleet, QA2_KEY) as other:  # nor may it read another's approval
        assert other.get(f"/v1/approvals/{mine['id']}").status_code == 404
        assert mine["id"] not in {a["id"] for a in other.get("/v1/approvals").json()["data"]}
    with approvals(fleet, QA_APPROVER_KEY) as requester:  # the requester follows its own
        assert requester.get(f"/v1/approvals/{mine['id']}").json()["status"] == "pending"
    assert decide(fleet, "apr_" + "0" * 32, "approve").status_code == 404
    bad = decide(fleet, mine["id"], "approve", reason=7)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reason"
    assert not runs(fleet, "transfer", amount=11)
    # An approver of another tenant decides it (and the tool runs).
    assert decide(fleet, mine["id"], "approve").status_code == 200
    assert answer_of(finished(fleet, mine["id"])) == "Moving it.transfer said: moved 11"


def test_an_approval_expires_into_a_rejection_and_then_answers_410(fleet: Fleet) -> None:
    needs_own_cluster(fleet)
    approval = parked(fleet, "#transfer 8")["fleet"]["approval"]
    assert 590 < approval["expires_at"] - time.time() < 610  # the tool's approval_ttl_s: 600
    handle("approvals").advance.remote(601).result()
    late = decide(fleet, approval["id"], "approve")
    assert late.status_code == 410, late.text
    done = finished(fleet, approval["id"])
    assert done["status"] == "expired" and done["decision"]["by"] == "system"
    assert "was expired" in answer_of(done) and "it was not run" in answer_of(done)
    assert not runs(fleet, "transfer", amount=8)


def test_two_gated_calls_in_one_turn_wait_for_both_decisions(fleet: Fleet) -> None:
    body = parked(fleet, "#twice")
    both = body["fleet"]["approvals"]
    assert [a["tool"] for a in both] == ["transfer", "transfer"] and both[0]["id"] != both[1]["id"]
    assert body["fleet"]["approval"] == both[0]
    first, second = (a["id"] for a in both)
    assert decide(fleet, first, "approve").status_code == 200
    with approvals(fleet) as client:
        held = client.get(f"/v1/approvals/{first}", params={"wait": 2}).json()
    assert held["status"] == "approved" and held["result"] is None  # the turn waits for the other
    assert not runs(fleet, "transfer", amount=1)
    assert decide(fleet, second, "reject", reason="one is enough").status_code == 200
    done = finished(fleet, first)
    assert done["status"] == "completed" and finished(fleet, second)["status"] == "rejected"
    assert answer_of(done).startswith("both: ")
    assert len(runs(fleet, "transfer", amount=1)) == 1 and not runs(fleet, "transfer", amount=2)


def test_no_path_runs_a_gated_tool_without_its_approval(fleet: Fleet) -> None:
    needs_own_cluster(fleet)
    body = parked(fleet, "#insist")
    approval, request_id = body["fleet"]["approval"], body["fleet"]["request_id"]
    store = fleet.audit_log.parent.parent / "approvals" / "fleet-test.db"
    with sqlite3.connect(store) as db:
        (turn,) = db.execute("SELECT turn FROM approvals WHERE id=?", (approval["id"],)).fetchone()
    # A forged resume of a turn nobody decided on: no replica takes it, nothing runs.
    assert handle("tester").resume.remote(turn).result() is None
    assert handle("approvals").start_run.remote(approval["id"], "forger").result() == ("refused", None)
    with approvals(fleet) as client:
        assert client.get(f"/v1/approvals/{approval['id']}").json()["status"] == "pending"
    # Rejected, the model asks again: that is a new approval, pending like the first.
    assert decide(fleet, approval["id"], "reject", reason="no").status_code == 200

    def asked_again() -> dict[str, Any] | None:
        with approvals(fleet) as client:
            mine = client.get("/v1/approvals", params={"agent": "tester"}).json()["data"]
        fresh = [a for a in mine if a["request_id"] == request_id and a["id"] != approval["id"]]
        return fresh[0] if fresh else None

    second = wait_until(asked_again, timeout_s=30, interval_s=0.2)
    assert second["status"] == "pending"
    assert decide(fleet, second["id"], "reject").status_code == 200
    done = finished(fleet, second["id"])
    assert answer_of(done).startswith("gave up: error: the call to 'transfer' was rejected")
    # Replayed decisions change nothing.
    assert decide(fleet, approval["id"], "approve").status_code == 409
    assert not runs(fleet, "transfer", amount=7)


def test_a_delegate_parks_the_whole_request_tree_and_its_caller_finishes(fleet: Fleet) -> None:
    body = parked(fleet, "#ticket")
    approval = body["fleet"]["approval"]
    assert (approval["agent"], approval["tool"]) == ("helper", "file_ticket")
    assert not runs(fleet, "file_ticket")
    assert decide(fleet, approval["id"], "approve").status_code == 200
    done = finished(fleet, approval["id"])
    assert done["status"] == "completed"
    assert answer_of(done) == "tester heard: helper: ticket filed: urgent"
    assert done["result"]["completion"]["fleet"]["agent"] == "tester"
    assert len(runs(fleet, "file_ticket", title="urgent")) == 1


def test_a_run_whose_replica_is_lost_shows_outcome_unknown_and_is_never_run_again(fleet: Fleet) -> None:
    needs_own_cluster(fleet)
    approval = parked(fleet, "#stall")["fleet"]["approval"]
    assert decide(fleet, approval["id"], "approve").status_code == 200
    wait_until(lambda: runs(fleet, "stall_transfer"), timeout_s=30, interval_s=0.1)  # it runs, for a minute
    kill_all("tester")
    done = finished(fleet, approval["id"], wait=90)  # its lease (3 s) lapses; another replica goes on
    assert done["status"] == "outcome_unknown", done
    assert "outcome is unknown" in answer_of(done) and "it was not run again" in answer_of(done)
    assert len(runs(fleet, "stall_transfer")) == 1
    with fleet.client(fleet.test_url, QA_KEY) as qa:
        story = qa.get(f"/v1/requests/{done['request_id']}/explain").json()
    assert "outcome_unknown" in [a["event"] for a in story["approvals"]]


def test_a_streamed_request_parks_the_same_way(fleet: Fleet) -> None:
    with (
        fleet.client(fleet.test_url, QA_KEY) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "tester",
                "stream": True,
                "messages": [{"role": "user", "content": "#transfer 3"}],
            },
        ) as response,
    ):
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    approval = last["fleet"]["approval"]
    assert text.startswith("Moving it. The action (transfer) awaits approval") and approval["id"] in text
    assert decide(fleet, approval["id"], "approve").status_code == 200
    assert answer_of(finished(fleet, approval["id"])) == "Moving it.transfer said: moved 3"


def test_a_session_gets_the_answer_that_came_after_the_approval(fleet: Fleet) -> None:
    headers = {"x-fleet-session-id": "approvals-session"}
    with fleet.client(fleet.test_url, QA_KEY) as client:
        first = client.post(
            "/v1/chat/completions",
            json={"model": "tester", "messages": [{"role": "user", "content": "#transfer 12"}]},
            headers=headers,
        )
        approval = first.json()["fleet"]["approval"]
        assert decide(fleet, approval["id"], "approve").status_code == 200
        finished(fleet, approval["id"])
        later = client.post(
            "/v1/chat/completions",
            json={"model": "tester", "messages": [{"role": "user", "content": "#system"}]},
            headers=headers,
        )
    assert later.status_code == 200
    history = handle("memory").session.remote("qa", "tester", _session_key(fleet)).result()
    said = [m["content"] for m in history if m["role"] == "assistant"]
    assert "Moving it.transfer said: moved 12" in said, said


def _session_key(fleet: Fleet) -> str:
    from serve.auth import PRINCIPAL_ID_HEX, hash_key

    return f"qa:{hash_key(QA_KEY)[:PRINCIPAL_ID_HEX]}/approvals-session"


def test_each_approval_is_posted_to_the_agents_webhook_and_retried(fleet: Fleet) -> None:
    assert fleet.hooks is not None
    approval = parked(fleet, "#transfer 13")["fleet"]["approval"]
    # The receiver answers the first POST of each approval 503: the service tries again.
    got = wait_until(
        lambda: [h for h in fleet.hooks.received if h["approval"]["id"] == approval["id"]][1:] or None,  # type: ignore[union-attr]
        timeout_s=20,
        interval_s=0.1,
    )
    posted = got[0]
    assert posted["type"] == "approval.requested"
    assert posted["approval"]["tool"] == "transfer" and posted["approval"]["status"] == "pending"
    assert CANARY_EMAIL not in json.dumps(posted)
    assert decide(fleet, approval["id"], "reject").status_code == 200


def test_bad_approval_requests_get_clear_errors(fleet: Fleet) -> None:
    with approvals(fleet) as client:
        bad_status = client.get("/v1/approvals", params={"status": "maybe"})
        assert bad_status.status_code == 400 and bad_status.json()["error"]["param"] == "status"
        bad_wait = client.get("/v1/approvals/apr_x", params={"wait": "soon"})
        assert bad_wait.status_code == 400 and bad_wait.json()["error"]["param"] == "wait"
        unknown_agent = client.get("/v1/approvals", params={"agent": "nobody"})
        assert unknown_agent.status_code == 404
        not_json = client.post(
            "/v1/approvals/apr_x/approve", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
    with httpx.Client(base_url=fleet.test_url, timeout=30) as anonymous:
        assert anonymous.get("/v1/approvals").status_code == 401


def test_the_example_fleet_parks_a_routed_leave_request_and_the_operators_cli_approves_it(
    fleet: Fleet,
) -> None:
    """configs/scripted.yaml, auth off: orchestrator routes to hr-policy-advisor, whose
    request_leave waits; `fleet approvals` without a key acts as the cluster's operator
    (through Ray), a principal other than the anonymous requester."""
    needs_own_cluster(fleet)
    with fleet.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={
                "model": "orchestrator",
                "messages": [{"role": "user", "content": "Book 3 days of leave for E1001 from 2026-12-14"}],
            },
        )
    assert answer.status_code == 200, answer.text
    approval = answer.json()["fleet"]["approval"]
    assert (approval["agent"], approval["tool"]) == ("hr-policy-advisor", "request_leave")
    env = {**os.environ, "RAY_ADDRESS": str(fleet.ray_address)}
    fleet_cli = [str(BIN / "fleet"), "approvals"]
    listed = subprocess.run(
        [*fleet_cli, "list", "--app", "fleet"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and approval["id"] in listed.stdout, listed.stderr[-2000:]
    shown = subprocess.run(
        [*fleet_cli, "show", approval["id"], "--app", "fleet", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(shown.stdout)["arguments"] == {
        "employee_id": "E1001",
        "days": 3,
        "start_date": "2026-12-14",
    }
    approved = subprocess.run(
        [*fleet_cli, "approve", approval["id"], "--app", "fleet", "--reason", "manager agreed"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert approved.returncode == 0, approved.stderr[-2000:]
    with fleet.client() as client:
        done = wait_until(
            lambda: (
                (got := client.get(f"/v1/approvals/{approval['id']}", params={"wait": 10}).json())["result"]
                and got
            ),
            timeout_s=60,
            interval_s=0.2,
        )
    assert done["status"] == "completed" and done["decision"]["by"] == "operator"
    content = answer_of(done)
    assert content.startswith("Done: leave request LR-") and "E1001, 3 days from 2026-12-14" in content
    assert done["result"]["completion"]["fleet"]["agent"] == "orchestrator"
    # Anonymous, the requester may not decide its own request.
    with fleet.client() as client:
        again = parked_example(client)
        own = client.post(f"/v1/approvals/{again}/approve", json={})
    assert own.status_code == 403 and "separation of duties" in own.json()["error"]["message"]


def parked_example(client: httpx.Client) -> str:
    answer = client.post(
        "/v1/chat/completions",
        json={
            "model": "hr-policy-advisor",
            "messages": [{"role": "user", "content": "Book 2 days of leave for E1002 from 2026-12-21"}],
        },
    )
    approval_id: str = answer.json()["fleet"]["approval"]["id"]
    return approval_id

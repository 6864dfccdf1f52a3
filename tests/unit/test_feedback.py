"""Outcomes of a repository's answers (scaleforge.serve.feedback): scored once for the version that answered
(and a shadow on the same labels), refused when unknown, expired, repeated or malformed."""

from __future__ import annotations

import pytest

from scaleforge.serve.feedback import Feedback, FeedbackError


def outputs(*classes: int) -> list[dict]:
    return [{"top_class": top, "probability": 0.9} for top in classes]


def test_labels_score_the_answering_version_and_the_shadow_and_rewards_the_answering_one_only() -> None:
    feedback = Feedback()
    first = feedback.answered("digits", 1, outputs(3, 5), class_names=[str(d) for d in range(10)])
    feedback.shadowed(first, 3, outputs(3, 3))
    second = feedback.answered("digits", 2, outputs(7))
    feedback.shadowed(second, 3, outputs(7))
    assert feedback.outcome(first, label=[3, "5"]).version == 1  # an index and a class name
    feedback.outcome(second, reward=0.25)
    sums = feedback.outcomes("digits")
    assert (sums[1].requests, sums[1].labelled, sums[1].correct) == (1, 2, 2)
    assert (sums[3].requests, sums[3].labelled, sums[3].correct, sums[3].rewarded) == (2, 2, 1, 0)
    assert (sums[2].rewarded, sums[2].reward_mean) == (1, 0.25)
    with pytest.raises(FeedbackError, match="has its outcome already") as repeated:
        feedback.outcome(first, label=[3, 5])
    assert repeated.value.status == 409 and feedback.outcomes("digits")[1].labelled == 2


@pytest.mark.parametrize(
    ("label", "reward", "status", "message"),
    [
        (None, None, 422, "give the request's true label"),
        (1, 0.5, 422, "give the request's true label"),
        ([1, 2, 3], None, 422, "the request had 2 instances, so give 2 labels, not 3"),
        (["one", 2], None, 422, "'one' is not one of the model's class names"),
        ([1.5, 2], None, 422, "1.5 is neither a class index nor a class name"),
        ([True, 2], None, 422, "True is neither a class index nor a class name"),
    ],
)
def test_a_malformed_outcome_is_refused_and_counts_nothing(label, reward, status: int, message: str) -> None:
    feedback = Feedback()
    request = feedback.answered("digits", 1, outputs(1, 2))
    with pytest.raises(FeedbackError, match=message) as refused:
        feedback.outcome(request, label=label, reward=reward)
    assert refused.value.status == status
    assert feedback.outcomes("digits")[1].outcomes == 0
    feedback.outcome(request, label=[1, 2])  # still waiting for a good one
    assert feedback.outcomes("digits")[1].correct == 2


def test_only_the_most_recent_answers_wait_for_their_outcomes() -> None:
    feedback = Feedback(capacity=2)
    oldest, *recent = [feedback.answered("digits", 1, outputs(0)) for _ in range(3)]
    with pytest.raises(FeedbackError, match="no answer with request_id") as expired:
        feedback.outcome(oldest, label=0)
    assert expired.value.status == 404
    for request in recent:
        feedback.outcome(request, label=0)
    assert feedback.outcomes("digits")[1].correct == 2


def test_answers_that_are_not_classes_take_rewards_only() -> None:
    feedback = Feedback()
    request = feedback.answered("regressor", 1, [{"values": [0.5]}])
    with pytest.raises(FeedbackError, match="not classes: give a reward instead"):
        feedback.outcome(request, label=0)
    feedback.outcome(request, reward=1.0)
    report = feedback.report("regressor", [1, 2], mde=0.5)
    assert [row.version for row in report.rows] == ["1", "2"] and report.metric == "reward"


def test_ab_report_merges_several_servers_logs_in_time_order(tmp_path, cli) -> None:  # noqa: ANN001
    import json
    import random

    rng = random.Random(0)
    events = []
    for index in range(600):  # version 2 ahead at first, behind later: the always-valid p-value depends on the order
        version = 1 + index % 2
        chance = {1: 0.5, 2: 0.9} if index < 300 else {1: 0.8, 2: 0.3}
        events.append({"event": "request", "model": "m", "version": version})
        events.append({"event": "label", "model": "m", "version": version, "right": [rng.random() < chance[version]]})
    lines = [json.dumps({"time": 1000.0 + number, **event}) + "\n" for number, event in enumerate(events)]
    whole, first, second = tmp_path / "whole.jsonl", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    whole.write_text("".join(lines))
    picks = [rng.random() < 0.5 for _ in lines]  # each event written by one of two servers
    first.write_text("".join(line for line, pick in zip(lines, picks, strict=True) if pick))
    second.write_text("".join(line for line, pick in zip(lines, picks, strict=True) if not pick))
    one = cli("ab", "report", str(whole), "--control", "1", "--look-every", "20", "--json")
    both = cli("ab", "report", str(second), str(first), "--control", "1", "--look-every", "20", "--json")
    assert one.code == both.code == 0
    assert json.loads(both.out) == json.loads(one.out)  # the same looks, in the same order, as one log gives
    assert {row["version"]: row["requests"] for row in json.loads(both.out)["versions"]} == {"1": 300, "2": 300}
    (tmp_path / "bad.jsonl").write_text(lines[0] + '{"event": "request", "model": "m", "version": 1}\n')
    untimed = cli("ab", "report", str(first), str(tmp_path / "bad.jsonl"))
    (tmp_path / "odd.jsonl").write_text(lines[0] + '{"time": 1, "event": "label", "model": "m", "version": 1}\n')
    unlabelled = cli("ab", "report", str(first), str(tmp_path / "odd.jsonl"))
    mixed = cli("ab", "report", "http://127.0.0.1:9", str(first))
    assert untimed.code == 2 and f"{tmp_path / 'bad.jsonl'}, line 2: not an event" in untimed.err
    assert unlabelled.code == 2 and f"{tmp_path / 'odd.jsonl'}, line 2: not an event" in unlabelled.err
    assert mixed.code == 2 and "give one server's URL, or feedback logs" in mixed.err

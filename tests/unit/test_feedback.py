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

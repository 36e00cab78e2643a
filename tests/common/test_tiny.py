"""``common.tiny``: the notice printed wherever a tiny model runs says which tiny model it is."""

from __future__ import annotations

from common.tiny import model_notice


def test_the_committed_and_the_random_tiny_model_say_what_they_are() -> None:
    trained, random = model_notice("tiny"), model_notice("tiny_random")
    assert "model.source=tiny " in trained and "trained from scratch" in trained and "NOT the paper's" in trained
    assert "model.source=tiny_random" in random and "random weights" in random and "noise" in random


def test_a_tiny_folder_given_as_naosd_path_is_named_instead_of_the_committed_weights() -> None:
    notice = model_notice("tiny", "runs/prior-naosd/naosd")
    assert "model.naosd_path=runs/prior-naosd/naosd" in notice and "NOT the paper's" in notice
    assert "trained from scratch" not in notice  # that describes the committed weights only


def test_user_supplied_weights_get_no_notice() -> None:
    assert model_notice("pretrained") is None and model_notice("pretrained", "/models/gdpo-sr") is None

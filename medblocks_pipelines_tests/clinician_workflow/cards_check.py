"""Spec checks of a CDS Hooks response (SPECS §4.4): shared by the tests."""

from typing import Any

INDICATORS = {"info", "warning", "critical"}


def assert_no_empty(value: Any, path: str = "$") -> None:
    """No null and no empty element anywhere (the empty top-level cards array is allowed)."""
    assert value is not None, f"null at {path}"
    if isinstance(value, dict):
        assert value, f"empty object at {path}"
        for k, v in value.items():
            assert_no_empty(v, f"{path}.{k}")
    elif isinstance(value, list):
        assert value, f"empty array at {path}"
        for i, v in enumerate(value):
            assert_no_empty(v, f"{path}[{i}]")
    elif isinstance(value, str):
        assert value, f"empty string at {path}"


def assert_valid_response(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the response shape; returns the cards."""
    assert set(body) <= {"cards", "systemActions"}
    cards = body["cards"]
    assert isinstance(cards, list)
    for card in cards:
        assert_no_empty(card)
        assert len(card["summary"]) < 140
        assert card["indicator"] in INDICATORS
        assert card["source"]["label"]
        assert card.get("uuid")
        if card.get("suggestions"):
            assert card["selectionBehavior"] in ("at-most-one", "any")
            for s in card["suggestions"]:
                assert s["uuid"] and s["label"]
                for a in s.get("actions", []):
                    assert a["type"] in ("create", "update", "delete") and a["description"]
        for link in card.get("links", []):
            assert link["type"] in ("absolute", "smart") and link["url"] and link["label"]
        for reason in card.get("overrideReasons", []):
            assert reason["display"]
    return cards

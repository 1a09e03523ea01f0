"""The test browser cannot leave loopback (no network here, and none wanted in CI)."""

from typing import Any

import pytest


def test_browser_cannot_resolve_outside_names(browser: Any) -> None:
    from selenium.common.exceptions import WebDriverException

    with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):
        browser.get("http://example.org/")

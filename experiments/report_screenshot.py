"""Save a screenshot of an HTML page (a `sinkscope report`'s index.html) with headless Chromium, as the docs'
report image was made: ``python experiments/report_screenshot.py PAGE.html OUT.png [WIDTH HEIGHT]``."""

from __future__ import annotations

import sys

from sinkscope.report.browser import screenshot


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        print("usage: python experiments/report_screenshot.py PAGE.html OUT.png [WIDTH HEIGHT]", file=sys.stderr)
        return 2
    width, height = (int(argv[2]), int(argv[3])) if len(argv) == 4 else (1280, 2400)
    print(screenshot(argv[0], argv[1], width=width, height=height))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The cache browser in a real browser: headless Chromium (selenium) against a real
`mirror serve` in front of the token-auth upstream registry.

Set MIRROR_SCREENSHOTS=docs/screenshots to write the README's screenshots there (they are
always written under the test's temporary directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import StartMirror
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from support.browser import chromium, console_errors, screenshot
from support.images import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    PUSH_CREDS,
    ImageInfo,
    Layout,
    push,
    skopeo,
    skopeo_copy_to_dir,
)
from support.procs import MirrorProc
from support.registry import Upstream

ANNOTATED = "test/annotated"
ANNOTATIONS = {
    "org.opencontainers.image.title": "Annotated demo",
    "org.opencontainers.image.description": "A small image the browser tests push, with "
                                            "every standard annotation <set>.",
    "org.opencontainers.image.licenses": "Apache-2.0 AND MIT",
    "org.opencontainers.image.source": "https://example.com/mirror/annotated",
    "org.opencontainers.image.revision": "0123456789abcdef0123456789abcdef01234567",
    "org.opencontainers.image.version": "1.0.0",
    "org.opencontainers.image.created": "2024-05-01T12:00:00Z",
    "org.opencontainers.image.vendor": "Example <b>Vendor</b>",
    "org.opencontainers.image.url": "https://example.com/annotated",
}
LABELS = {
    "org.opencontainers.image.title": "the config's title, which the annotation outranks",
    "maintainer": "someone",
}
SCREENSHOTS = ("overview.png", "repository.png", "image.png")


def build_annotated(root: Path) -> ImageInfo:
    """An OCI image whose manifest carries every standard annotation and whose config
    carries labels."""
    layout = Layout(root)
    layer, diff_id = layout.layer({"hello.txt": b"annotated\n"}, OCI_LAYER_GZIP)
    config = {"created": "2024-05-01T12:00:00Z", "architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/hello"], "Labels": LABELS},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    cdesc = {"mediaType": OCI_CONFIG, **layout.add(json.dumps(config).encode())}
    layout.blobs.append((cdesc["digest"], cdesc["size"]))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc,
                "layers": [layer], "annotations": ANNOTATIONS}
    desc = {"mediaType": OCI_MANIFEST, **layout.add(json.dumps(manifest).encode())}
    layout.tag(desc, "1.0")
    return ImageInfo(ANNOTATED, "1.0", desc["digest"], OCI_MANIFEST, desc["size"],
                     layout.blobs, layout=str(root))


@pytest.fixture(scope="module")
def annotated(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    """test/annotated:1.0, also tagged 1 and latest, beside a two-platform index (multi)."""
    image = build_annotated(tmp_path_factory.mktemp("annotated") / "layout")
    push(image, upstream.host)
    index = upstream.images["test/oci-index:1.0"]
    for source, tag in ((image.ref, "1"), (image.ref, "latest"), (index.ref, "multi")):
        skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
               "--dest-tls-verify=false", f"--src-creds={PUSH_CREDS}",
               f"--dest-creds={PUSH_CREDS}", f"docker://{upstream.host}/{source}",
               f"docker://{upstream.host}/{ANNOTATED}:{tag}")
    return image


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path / "chromium") as driver:
        yield driver


def pull(mirror: MirrorProc, ref: str, dest: Path, creds: str | None = None) -> None:
    skopeo_copy_to_dir(f"{mirror.host}/{ref}", dest, creds=creds)


def text(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def links(driver: WebDriver) -> list[str]:
    return [str(a.text) for a in driver.find_elements(By.CSS_SELECTOR, "main a")]


def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def keep_screenshots(shots: Path) -> None:
    target = os.environ.get("MIRROR_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in SCREENSHOTS:
            shutil.copyfile(shots / name, Path(target) / name)


def test_pages_show_what_the_visitor_may_read(
    upstream: Upstream, annotated: ImageInfo, start_mirror: StartMirror, browser: WebDriver,
    tmp_path: Path,
) -> None:
    mirror = start_mirror()
    index = upstream.images["test/oci-index:1.0"]
    private = upstream.images["private/secret:1.0"]
    pull(mirror, annotated.ref, tmp_path / "a1")
    pull(mirror, annotated.ref, tmp_path / "a2")  # pulled twice: first of "most pulled"
    for tag in ("1", "latest", "multi"):
        pull(mirror, f"{ANNOTATED}:{tag}", tmp_path / tag)
    pull(mirror, index.ref, tmp_path / "index")
    pull(mirror, private.ref, tmp_path / "secret", creds="alice:alicepw")
    # Pulled only with alice's credentials: no anonymous grant, so not public here.
    pull(mirror, "test/oci-single:1.0", tmp_path / "single", creds="alice:alicepw")
    shots = tmp_path / "screenshots"

    # -- anonymous: public repositories only ---------------------------------------------
    browser.get(f"{mirror.url}/ui/")
    assert browser.title == "Overview · mirror"
    until(lambda: (browser.refresh() or True) and ANNOTATED + ":1.0" in text(browser),
          "the pull counts to reach the overview")
    page = text(browser)
    assert ANNOTATED in links(browser) and index.repo in links(browser)
    assert private.repo not in page and "test/oci-single" not in page
    most = browser.find_elements(By.CSS_SELECTOR, "section[aria-labelledby=popular-heading] tr")
    assert "docker.io/test/annotated:1.0 2" in [str(r.text) for r in most]
    assert "Hit ratio, blobs" in page and "Fetched upstream" in page and "entries" in page
    assert "None right now." in page  # the downloads table, drawn by the script as well
    time.sleep(1.5)
    assert "None right now." in text(browser)
    assert console_errors(browser) == []  # no CSP violation, no script error
    screenshot(browser, shots / "overview.png")

    browser.get(f"{mirror.url}/ui/?q=test%2Foci")
    assert index.repo in links(browser) and ANNOTATED not in links(browser)

    browser.get(f"{mirror.url}/ui/docker.io/{ANNOTATED}")
    rows = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "table.tags tbody tr"):
        cells = [str(c.text) for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
        rows[cells[0]] = cells[1:]
    assert list(rows) == ["1", "1.0", "latest", "multi"]  # in tag order
    digest, media_type, platforms, size, used, pulls = rows["1.0"]
    assert digest == annotated.digest[:19] and media_type == "OCI manifest"
    assert platforms == "linux/amd64" and size.endswith("kB") and used.endswith("UTC")
    assert pulls == "2"
    digest, media_type, platforms, size, used, pulls = rows["multi"]
    assert digest == index.digest[:19] and media_type == "OCI index"
    assert platforms == "linux/amd64, linux/arm64" and pulls == "1"
    screenshot(browser, shots / "repository.png")

    browser.get(f"{mirror.url}/ui/docker.io/{ANNOTATED}:1.0")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Annotated demo"
    facts = dict(zip([str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "dl dt")],
                     [str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "dl dd")],
                     strict=True))
    page = text(browser)
    assert ANNOTATIONS["org.opencontainers.image.description"] in page
    assert facts["Licences"] == "Apache-2.0 AND MIT"
    assert facts["Source"] == "https://example.com/mirror/annotated"
    assert facts["Revision"] == ANNOTATIONS["org.opencontainers.image.revision"]
    assert facts["Version"] == "1.0.0"
    assert facts["Created"] == "2024-05-01T12:00:00Z"
    assert facts["Vendor"] == "Example <b>Vendor</b>"  # shown as text, not markup
    assert facts["URL"] == "https://example.com/annotated"
    assert facts["Digest"] == annotated.digest and facts["Platform"] == "linux/amd64"
    assert facts["Pinned"] == "no" and facts["Pulls of this tag"] == "2"
    assert facts["Fetched"].endswith("UTC") and facts["Last pulled"].endswith("UTC")
    source = browser.find_element(By.LINK_TEXT, "https://example.com/mirror/annotated")
    assert source.get_attribute("href") == "https://example.com/mirror/annotated"
    commands = [str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "pre.cmd")]
    assert commands == [f"docker pull {mirror.host}/{ANNOTATED}:1.0",
                        f"podman pull --tls-verify=false {mirror.host}/docker.io/{ANNOTATED}:1.0"]
    layers = browser.find_elements(By.CSS_SELECTOR, "section[aria-labelledby=layers-heading] "
                                                    "tbody tr")
    assert [str(r.text).split()[0] for r in layers] == ["config", "1"]
    assert console_errors(browser) == []
    screenshot(browser, shots / "image.png")

    browser.get(f"{mirror.url}/ui/docker.io/{index.repo}@{index.digest}")
    platforms = browser.find_elements(By.CSS_SELECTOR, "section[aria-labelledby="
                                                       "platforms-heading] tbody th")
    assert [str(p.text) for p in platforms] == ["linux/amd64", "linux/arm64"]

    browser.get(f"{mirror.url}/ui/docker.io/{private.repo}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"
    browser.get(f"{mirror.url}/ui/docker.io/{private.repo}@{private.digest}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"
    keep_screenshots(shots)

    # -- alice signs in: her private repository appears ----------------------------------
    browser.get(f"http://alice:alicepw@{mirror.host}/ui/login")
    until(lambda: urlsplit(browser.current_url).path == "/ui/", "the sign-in to land")
    # Chromium follows that first redirect without the credentials it took from the URL;
    # it sends them (from its cache for the realm) with every later request under /ui/.
    browser.get(f"{mirror.url}/ui/")
    assert "Signed in as alice" in text(browser)
    assert private.repo in links(browser) and "test/oci-single" in links(browser)
    browser.get(f"{mirror.url}/ui/docker.io/{private.repo}:1.0")
    assert "Signed in as alice" in text(browser)
    assert browser.find_element(By.TAG_NAME, "h1").text == f"{private.repo}:1.0"
    assert private.digest in text(browser)


def test_signing_in_proves_access_upstream(
    upstream: Upstream, start_mirror: StartMirror, browser: WebDriver, tmp_path: Path,
) -> None:
    """bob has no grant here: the listing asks the upstream with his credentials, which
    shows him test/oci-single (he may pull it) and not private/secret (he may not)."""
    mirror = start_mirror()
    pull(mirror, "private/secret:1.0", tmp_path / "secret", creds="alice:alicepw")
    pull(mirror, "test/oci-single:1.0", tmp_path / "single", creds="alice:alicepw")
    browser.get(f"{mirror.url}/ui/")
    assert "test/oci-single" not in links(browser) and "private/secret" not in links(browser)
    heads = upstream.registry.mark()

    browser.get(f"http://bob:bobpw@{mirror.host}/ui/login")
    until(lambda: urlsplit(browser.current_url).path == "/ui/", "the sign-in to land")
    browser.get(f"{mirror.url}/ui/")
    assert "Signed in as bob" in text(browser)
    assert "test/oci-single" in links(browser) and "private/secret" not in links(browser)
    probes = [r for r in upstream.registry.requests(since=heads) if r.method == "HEAD"]
    assert {(r.path.split("/manifests/")[0], r.status) for r in probes} >= {
        ("/v2/test/oci-single", 200)}
    browser.get(f"{mirror.url}/ui/docker.io/private/secret:1.0")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"



def test_headers_and_switching_the_pages_off(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    page = httpx.get(f"{mirror.url}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
    for inline in (r"<[^>]*\son[a-z]+\s*=", r"<script(?![^>]*\bsrc=)", r"<[^>]*\sstyle\s*="):
        assert re.search(inline, page.text) is None, inline  # no inline handler or style
    login = httpx.get(f"{mirror.url}/ui/login")
    assert login.status_code == 401
    assert login.headers["www-authenticate"] == 'Basic realm="mirror"'
    wrong = httpx.get(f"{mirror.url}/ui/login", auth=("bob", "wrong"))
    assert wrong.status_code == 401 and "refused these credentials" in wrong.text
    right = httpx.get(f"{mirror.url}/ui/login?next=/ui/docker.io/", auth=("bob", "bobpw"))
    assert right.status_code == 303 and right.headers["location"] == "/ui/docker.io/"
    away = httpx.get(f"{mirror.url}/ui/login?next=//evil.example/", auth=("bob", "bobpw"))
    assert away.headers["location"] == "/ui/"
    signed = httpx.get(f"{mirror.url}/ui/", auth=("bob", "wrong"))
    assert signed.status_code == 200 and "Sign-in refused" in signed.text
    progress = httpx.get(f"{mirror.url}/ui/-/downloads.json")
    assert json.loads(progress.text) == {"downloads": []}

    off = start_mirror(args=["--no-ui"])
    assert httpx.get(f"{off.url}/ui/").status_code == 404
    assert httpx.get(f"{off.url}/ui/login").status_code == 404

"""`mirror seed`: pull images into the cache ahead of time, through the server's own services.

Manifests go through `ManifestService` and blobs through `BlobService` (so through `Fills`,
whose locks are shared with any server running on the same cache: a blob being fetched by
both is fetched once). Each image's tag is recorded, its repository linked to everything it
holds, and all of it pinned unless asked not to. Seeding uses the mirror's own account; a
repository that an anonymous probe finds public gets an anonymous grant (which counts
offline), others stay readable only by callers who prove their access.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mirror import errors, oci, policy
from mirror.access import MANIFEST_ACCEPT
from mirror.airgap.progress import Progress, Task, human_bytes, human_duration
from mirror.identity import ANONYMOUS_CALLER
from mirror.imageref import ImageRef
from mirror.manifests import MANIFEST_TYPES, ManifestInfo, accept_key
from mirror.metadata import RefRecord
from mirror.oci import Descriptor, Platform
from mirror.reference import parse_digest
from mirror.services import Services
from mirror.upstream import UpstreamClient

# Ask for every manifest type: an index when there is one, as the upstream stores it.
SEED_ACCEPT = accept_key([", ".join(MANIFEST_TYPES)])
IMAGES_AT_ONCE = 4
BLOBS_AT_ONCE = 8


@dataclass
class Outcome:
    ref: ImageRef
    digest: str = ""
    fetched: int = 0  # bytes downloaded
    cached: int = 0  # bytes already in the cache
    blobs: int = 0
    images: int = 0  # platform manifests
    error: str | None = None
    digests: list[str] = field(default_factory=list)


class Seeder:
    def __init__(
        self, services: Services, progress: Progress,
        platforms: Sequence[Platform] = (), pin: bool = True,
    ) -> None:
        self.services = services
        self.progress = progress
        self.platforms = list(platforms)
        self.pin = pin
        self.policies = policy.policies(services.settings.upstreams)
        self._images = asyncio.Semaphore(IMAGES_AT_ONCE)
        self._blobs = asyncio.Semaphore(BLOBS_AT_ONCE)

    async def seed_all(self, refs: Sequence[ImageRef]) -> list[Outcome]:
        return list(await asyncio.gather(*(self.seed(ref) for ref in refs)))

    async def seed(self, ref: ImageRef) -> Outcome:
        outcome = Outcome(ref)
        async with self._images:
            task = self.progress.task(str(ref))
            started = time.monotonic()
            try:
                await self._seed(ref, outcome, task)
            except (errors.RegistryError, oci.ManifestError) as exc:
                outcome.error = str(exc)
                task.fail(outcome.error)
                return outcome
            except Exception as exc:  # one image's bug must not stop the others
                outcome.error = f"{type(exc).__name__}: {exc}"
                task.fail(outcome.error)
                return outcome
            elapsed = time.monotonic() - started
            rate = outcome.fetched / elapsed if elapsed > 0 else 0.0
            task.finish(
                f"{outcome.digest}, {outcome.images} platform(s), {outcome.blobs} blobs, "
                f"{human_bytes(outcome.fetched)} fetched ({human_bytes(rate)}/s), "
                f"{human_bytes(outcome.cached)} already cached, {human_duration(elapsed)}")
        return outcome

    async def _seed(self, ref: ImageRef, outcome: Outcome, task: Task) -> None:
        services = self.services
        policy.check(self.policies, ref.upstream, ref.repo)  # refused: nothing is fetched
        client = services.clients[ref.upstream]
        if ref.digest is not None:
            root_digest = parse_digest(ref.digest)
        else:
            assert ref.tag is not None
            info = await services.manifests.resolve_fresh(
                client, ref.repo, ref.tag, SEED_ACCEPT, None, "seed") \
                or await services.manifests.resolve(client, ref.repo, ref.tag, SEED_ACCEPT)
            root_digest = info.digest
        manifests: dict[str, str] = {}
        layers: dict[str, int] = {}
        root = await self._manifest(client, ref.repo, Descriptor("", str(root_digest), -1),
                                    manifests, layers, outcome)
        outcome.digest = str(root_digest)
        missing = {d: s for d, s in layers.items()
                   if await services.store.committed_size(parse_digest(d)) is None
                   or not await services.store.holds(client.name, parse_digest(d))}
        outcome.blobs = len(layers)
        outcome.cached = sum(max(s, 0) for d, s in layers.items() if d not in missing)
        task.set_total(sum(max(s, 0) for s in missing.values()))
        await asyncio.gather(*(self._blob(client, ref.repo, d, task, outcome) for d in missing))

        metadata = services.metadata
        media_type, size = manifests[str(root_digest)], root.size
        if ref.tag is not None:
            await services.manifests.record(
                client, ref.repo, ref.tag, None, ManifestInfo(root_digest, media_type, size))
        if ref.digest is not None:
            await metadata.add_ref(RefRecord(ref.upstream, ref.repo, str(root_digest),
                                             media_type, size))
        outcome.digests = [*manifests, *layers]
        await metadata.link(ref.upstream, ref.repo, outcome.digests)
        if self.pin:
            await services.store.pin(str(ref), outcome.digests)
        await self._probe_public(client, ref.repo, str(root_digest))

    async def _probe_public(self, client: UpstreamClient, repo: str, digest: str) -> None:
        """An anonymous grant for what anyone may read (see `mirror.access`, rule 3)."""
        access = self.services.access
        if await self.services.metadata.granted(client.name, repo, ANONYMOUS_CALLER.identity):
            return
        try:
            response = await client.send(
                "HEAD", f"/v2/{repo}/manifests/{digest}", repo=repo,
                headers={"Accept": MANIFEST_ACCEPT},
                credential=access.probe_credential(client, ANONYMOUS_CALLER))
        except errors.RegistryError:
            return
        if response.status_code == 200:
            await access.proven(client, repo, ANONYMOUS_CALLER)

    async def _manifest(
        self, client: UpstreamClient, repo: str, desc: Descriptor,
        manifests: dict[str, str], layers: dict[str, int], outcome: Outcome, depth: int = 0,
    ) -> Descriptor:
        """Fetch `desc` and, for an index, the children we keep; collect their blobs."""
        digest = parse_digest(desc.digest)
        manifest = await self.services.manifests.get(
            client, repo, digest, cached=await self.services.access.holds(client, digest))
        doc = oci.load(manifest.data)
        manifests[desc.digest] = manifest.info.media_type
        if not oci.is_index(doc, manifest.info.media_type):
            outcome.images += 1
            for blob in oci.blobs(doc):
                layers[blob.digest] = blob.size
            return Descriptor(manifest.info.media_type, desc.digest, manifest.info.size)
        if depth > 4:
            raise oci.ManifestError(f"manifest {desc.digest}: indexes nested too deep")
        kids = oci.children(doc)
        kept = [k for k in kids if self._wanted(k)]
        if kids and not kept:
            found = ", ".join(sorted({str(k.platform) for k in kids if k.platform})) or "none"
            wanted = ", ".join(map(str, self.platforms))
            raise errors.ManifestUnknown(f"no platform matches {wanted} (the index has {found})")
        await asyncio.gather(*(self._manifest(client, repo, k, manifests, layers, outcome,
                                              depth + 1) for k in kept))
        return Descriptor(manifest.info.media_type, desc.digest, manifest.info.size)

    def _wanted(self, child: Descriptor) -> bool:
        if not self.platforms:
            return True
        if child.platform is None:
            return False
        platform = child.platform
        return any(p.matches(platform) for p in self.platforms)

    async def _blob(
        self, client: UpstreamClient, repo: str, digest: str, task: Task, outcome: Outcome
    ) -> None:
        async with self._blobs:
            parsed = parse_digest(digest)
            reader = await self.services.blobs.open(
                client, repo, parsed, cached=await self.services.access.holds(client, parsed))
            # Reading to the end returns only once the fill is verified and committed.
            async for chunk in reader.chunks(0, None):
                outcome.fetched += len(chunk)
                task.advance(len(chunk))


def summary(outcomes: Sequence[Outcome], elapsed: float) -> str:
    ok = [o for o in outcomes if o.error is None]
    fetched = sum(o.fetched for o in outcomes)
    cached = sum(o.cached for o in ok)
    rate = fetched / elapsed if elapsed > 0 else 0.0
    lines = [f"seeded {len(ok)} of {len(outcomes)} image(s): {human_bytes(fetched)} fetched "
             f"in {human_duration(elapsed)} ({human_bytes(rate)}/s), "
             f"{human_bytes(cached)} already cached"]
    lines += [f"  failed: {o.ref}: {o.error}" for o in outcomes if o.error is not None]
    return "\n".join(lines)

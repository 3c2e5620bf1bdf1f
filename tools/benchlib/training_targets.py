"""Issue 25's targets for shuffled training epochs behind a slow link, from
``tools/bench_remote_epoch.py``'s rows (one per mode, view and epoch; ``link`` counted at the
proxy). Every target is ``{"value", "limit", "met", ...}`` (``met``: value <= limit), its
value the worst epoch's, the epochs' own values under ``per_epoch``:

(a) ``sampler`` (a mount + ``RecordShuffleSampler(MNT/view)``) and ``dataset``
    (``pcrfs.torch.ImageFolder`` + ``RecordShuffleSampler`` + ``fetch_ahead``): GET per
    image <= 0.05; bytes over the link <= 1.15x the view's; epoch <= 1.3 x max(link time of
    the view's bytes, the cached decode epoch: the ``cached`` mode, the same loader over a
    local copy of the view's files, the faster of its epochs); epoch <= 0.5x WebDataset's
    (``wds``, the same epoch number).
(b) ``sampler4m`` / ``sampler4m_ra`` (a default sampler over a mount with a 4M cache,
    readahead off / at the mount's default): bytes <= 1.15x the view's.
(c) ``ranks2`` / ``dataset_ranks2`` (two ranks at once): bytes of both together <= 1.15x
    the view's; every rank the same number of samples, together at least the view's images.
"""
from __future__ import annotations

GETS = 0.05
BYTES = 1.15
TIME = 1.3
WDS = 0.5


def target(value: float, limit: float, **extra) -> dict:
    return {"value": value, "limit": limit, "met": bool(value <= limit), **extra}


def rows_of(rows: list[dict], mode: str, view: str) -> list[dict]:
    return sorted((r for r in rows if r["mode"] == mode and r["view"] == view), key=lambda r: r["epoch"])


def cached_epoch(rows: list[dict], view: str) -> float | None:
    """The cached decode epoch: the faster epoch of the ``cached`` mode (a local copy of ``view``)."""
    cached = rows_of(rows, "cached", view)
    return min(r["seconds"] for r in cached) if cached else None


def worst(values: list[float], limit: float, **extra) -> dict:
    return target(max(values), limit, per_epoch=values, **extra)


def mode_a(rs: list[dict], key: str, vb: int, link_s: float, cached: float | None, wds: dict) -> dict:
    out = {f"{key}_gets_per_image_le_{GETS}": worst([r["gets_per_image"] for r in rs], GETS),
           f"{key}_bytes_le_{BYTES}_view": worst([round(r["link"]["bytes"] / vb, 3) for r in rs], BYTES)}
    if cached is not None:
        bound = round(TIME * max(link_s, cached), 2)
        out[f"{key}_epoch_le_{TIME}_max_link_cached"] = worst(
            [r["seconds"] for r in rs], bound, link_s=round(link_s, 2), cached_s=cached,
            cached_from="the same loader over a local copy of the view's files (cached mode, faster epoch)")
    paired = [r for r in rs if r["epoch"] in wds]
    if paired:
        out[f"{key}_epoch_le_{WDS}_wds"] = worst([round(r["seconds"] / wds[r["epoch"]], 3) for r in paired], WDS,
                                                  seconds=[r["seconds"] for r in paired],
                                                  wds_seconds=[wds[r["epoch"]] for r in paired])
    return out


def mode_c(rs: list[dict], key: str, vb: int, images: int) -> dict:
    out = {f"{key}_bytes_together_le_{BYTES}_view": worst([round(r["link"]["bytes"] / vb, 3) for r in rs], BYTES,
                                                          gets_per_image=[r["gets_per_image"] for r in rs])}
    counts = [[rk["images"] for rk in r["ranks"]] for r in rs]
    equal = all(len(set(c)) == 1 and sum(c) >= images for c in counts)
    out[f"{key}_equal_samples_per_rank"] = {"value": counts, "limit": f"equal per rank, together >= {images}",
                                            "met": equal}
    return out


def evaluate_training(rows: list[dict], view_bytes: dict, rate: float, images: int) -> dict:
    """Every target of issue 25 that ``rows`` have the modes for, per view."""
    out: dict = {}
    wds = {r["epoch"]: r["seconds"] for r in rows if r["mode"] == "wds"}
    for view in dict.fromkeys(r["view"] for r in rows if r["mode"] != "wds"):
        vb = view_bytes.get(view)
        if not vb:
            continue
        for mode in ("sampler", "dataset"):
            rs = rows_of(rows, mode, view)
            if rs:
                out.update(mode_a(rs, f"a_{mode}_{view}", vb, vb / rate, cached_epoch(rows, view), wds))
        for mode in ("sampler4m", "sampler4m_ra"):
            rs = rows_of(rows, mode, view)
            if rs:
                out[f"b_{mode}_{view}_bytes_le_{BYTES}_view"] = worst(
                    [round(r["link"]["bytes"] / vb, 3) for r in rs], BYTES,
                    gets_per_image=[r["gets_per_image"] for r in rs], window=rs[0].get("window"))
        for mode in ("ranks2", "dataset_ranks2"):
            rs = rows_of(rows, mode, view)
            if rs:
                out.update(mode_c(rs, f"c_{mode}_{view}", vb, images))
    return out

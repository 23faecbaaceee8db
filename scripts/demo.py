"""`make demo`: publish a real small model end to end, offline, against a local Hub server.

quantize (SignRound, light recipe, reduced calibration) -> compare int4 vs 16-bit -> perplexity on held-out
text -> model card -> upload (each format on its own branch, tagged) to a Hub-compatible server started here.
Then print the repo's revisions and where the card is. Under 10 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hubserver import HubServer  # noqa: E402

MODEL = "pypi:gemma3-270m"  # Gemma 3 270M, shipped as GGUF on PyPI (Makefile: MODELS)
REPO = "demo/gemma-3-270m-int4"
RUN = Path("runs") / "demo"  # relative: the card's reproduce command shows it as typed
TOKEN = "hf_demo_local_only"
DEMO_ARGS = [
    "--recipe", "light", "--nsamples", "16", "--seqlen", "256", "--iters", "40",
    "--tasks", "ppl", "--limit", "8",
]  # fmt: skip


def main() -> int:
    """Run `hubtool publish` against a local Hub, then show what landed where."""
    t0 = time.perf_counter()
    with HubServer() as hub:
        hub.state.add_user(TOKEN, "demo")
        env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "hubtool", "publish", MODEL, "--repo-id", REPO, "-o", str(RUN),
               "--endpoint", hub.url, "--overwrite", "--config", "scripts/demo.toml", *DEMO_ARGS]  # fmt: skip
        print("$ hubtool " + " ".join(cmd[3:]).replace(hub.url, "http://127.0.0.1:<port>"), flush=True)
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)

        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.url, token=TOKEN)
        refs = api.list_repo_refs(REPO)
        print(f"\nrepo {REPO} on the local Hub:")
        for b in refs.branches:
            files = api.list_repo_files(REPO, revision=b.name)
            print(f"  branch {b.name:<12} {b.target_commit[:12]}  {len(files)} files")
        for t in refs.tags:
            print(f"  tag    {t.name:<12} {t.target_commit[:12]}")
    run_abs = ROOT / RUN
    from hubtool import record

    for c in record.load(run_abs).comparisons[:1]:  # one prompt: the 16-bit answer, then each int4 answer
        print(f"\nprompt: {c.prompt}")
        for g in c.generations:
            how = "the 16-bit source" if g.model == c.generations[0].model else "loaded back from its export"
            print(f"--- {g.model} ({how}, {g.tokens_per_s:.1f} tokens/s)\n{g.text}")
    card = run_abs / "card" / "README.md"
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    for f in (run_abs / "card").iterdir():
        if f.is_file():
            shutil.copy2(f, docs / ("demo_card.md" if f.name == "README.md" else f.name))
    print(f"\ncard: {card}  (copied to docs/demo_card.md)")
    print(f"demo took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

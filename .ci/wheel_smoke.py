"""Smoke test of the installed wheel, run from a temporary folder outside the repository (make wheel-test).

Checks what a researcher does first in a notebook: the package imports from site-packages (not the
checkout), the offline model loads, the project's SAE loads by name, the shipped prompts are found,
every method steers one generation, and the command line answers.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import saesteer as ss
from saesteer.data import load_insults

here = Path.cwd()
pkg = Path(ss.__file__).resolve()
assert "site-packages" in pkg.parts, f"saesteer imported from {pkg}, not from the installed wheel"
assert not (here / "saesteer").exists() and not (here / "storage").exists(), "run me from an empty folder"

model = ss.load_model("smollm2-135m")
sae = ss.load_sae("smollm2-135m-res-15-4608", model=model)
align, ref = ss.target_prompts("non-toxic")
assert len(align) == 20 and len(ref) == 150, (len(align), len(ref))

insults = load_insults("train")
toxic = [t for t, y in zip(insults.texts, insults.labels) if y == 1][:24]
clean = [t for t, y in zip(insults.texts, insults.labels) if y == 0][:24]
table = ss.toxicity_latents(model, sae, toxic, clean, top_n=None, max_length=32)
latents = ss.select_latents(table, 5)
scores = ss.score_latents(model, sae, align[:5], ref[:20])
sub = ss.SASA(beta=5.0, gen_wv_data={"pos": clean, "neg": toxic}, gen_wv_max_length=32).steer(model, progress=False)

prompt = ["So I told him he was a"]
plain = ss.generate(model, prompt, max_new_tokens=8, do_sample=False).texts[0]
methods = {
    "decoder": dict(steerers=[ss.DecoderSteering(sae, latents, tier="constant", alpha=0.5)]),
    "swap": dict(steerers=[ss.LatentSteering(sae, scores, mode="swap", strength=1.0)]),
    "clamp": dict(steerers=[ss.LatentSteering(sae, scores, mode="clamp", strength=20.0)]),
    "weight": dict(steerers=[ss.LatentSteering(sae, scores, mode="weight", strength=1.0)]),
    "sasa": dict(decoder=ss.SASADecoder([ss.Attribute(sub, 50.0)], margin_transform="raw")),
}
changed = []
for name, kw in methods.items():
    text = ss.generate(model, prompt, max_new_tokens=8, do_sample=False, **kw).texts[0]
    assert isinstance(text, str) and text, name
    changed.append(text != plain)
    print(f"{name:8s} {text!r}")
assert any(changed), "no method changed the greedy continuation"

for args in (["--help"], ["demo", "--help"], ["evaluate", "run", "--help"], ["train-sae", "--help"]):
    done = subprocess.run([sys.executable, "-m", "saesteer.cli", *args], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0 and "usage: saesteer" in done.stdout, (args, done.stderr[-500:])
bad = subprocess.run([sys.executable, "-m", "saesteer.cli", "demo", "--beta", "-1"], capture_output=True, text=True)
assert bad.returncode == 2 and "beta" in bad.stderr, bad.stderr
assert sorted(p.name for p in here.iterdir()) == [], f"the smoke test wrote into {here}: {list(here.iterdir())}"

# The README's examples, as written, from this empty folder: every python block before "## The demo".
readme = Path(sys.argv[1]).read_text(encoding="utf-8")
blocks = re.findall(r"```python\n(.*?)```", readme[: readme.index("## The demo")], flags=re.S)
assert len(blocks) >= 5, f"found only {len(blocks)} README examples"
namespace: dict = {}
for i, block in enumerate(blocks):
    print(f"--- README example {i + 1}/{len(blocks)}", flush=True)
    exec(compile(block, f"README.md example {i + 1}", "exec"), namespace)
print("wheel smoke test passed:", pkg.parent)

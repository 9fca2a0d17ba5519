# %% [markdown]
# # GLM-Image offline, from Python (no server)
#
# `GlmImage` starts the AR and DiT workers as child processes, runs the router's scheduler inside
# this process, and stops everything when the `with` block ends (also on an exception or Ctrl-C).
# Run it as a script (`.venv/bin/python examples/offline_python.py`) or cell by cell in a notebook
# (VS Code and Jupytext read the `# %%` markers). Without `GLM_MODEL` it uses the tiny random-weight
# model on CPU, whose images are noise: set `GLM_MODEL=/models/GLM-Image` (and `GLM_STAGE_CONFIG`,
# default stage_configs/glm_image.yaml: one GPU per stage) for real pictures. docs/offline.md has more.

# %%
import os
import time
from pathlib import Path

from client.offline import GlmImage, InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("GLM_OUT", "offline-example"))
OUT.mkdir(exist_ok=True)

MODEL = os.environ.get("GLM_MODEL")
if MODEL:
    STAGE_CONFIG = os.environ.get("GLM_STAGE_CONFIG", str(ROOT / "stage_configs" / "glm_image.yaml"))
    SIZE, STEPS = "1024x1024", None  # None: the stage config's defaults
else:
    from model_presets.tiny_model import build_tiny_model

    MODEL = str(build_tiny_model(ROOT / "models" / "tiny-glm-image"))  # built once, without network
    STAGE_CONFIG = str(ROOT / "stage_configs" / "glm_image_tiny_cpu.yaml")
    SIZE, STEPS = "256x256", 2

# %% [markdown]
# Start the workers (this takes a while with real weights: both stages load their models).
# Outside a notebook, prefer `with GlmImage(...) as glm:`; here the object lives across cells and
# `glm.close()` at the end stops it (interpreter exit would too).

# %%
glm = GlmImage(MODEL, STAGE_CONFIG)
print(f"workers ready in {glm.started_in_s:.1f}s: {glm.live_workers()}")

# %% [markdown]
# ## Text to image
# `generate` returns one `ImageResult` per image: `.image` (a PIL image), `.data` (the encoded
# bytes, identical to what the HTTP API returns for the same request and seed), `.seed`, `.timings`.

# %%
[lighthouse] = glm.generate('a lighthouse at dawn, "HELLO" painted on it', size=SIZE, seed=1, steps=STEPS)
lighthouse.save(OUT / "lighthouse.png")
print(lighthouse.seed, lighthouse.size, lighthouse.timings)
lighthouse.image  # a notebook shows it

# %% [markdown]
# ## Several images, and editing one
# `n` images use seeds seed, seed+1, ...; `images=[...]` (paths, bytes or PIL images) makes it
# image-to-image, at the first image's size unless `size` is given.

# %%
variants = glm.generate("a red bicycle against a blue wall", size=SIZE, seed=10, n=2, steps=STEPS)
[snowy] = glm.generate("make it snow", images=[lighthouse.image], seed=2, steps=STEPS)
snowy.save(OUT / "lighthouse-snow.png")
print([v.seed for v in variants], snowy.size)

# %% [markdown]
# ## Mistakes get the HTTP API's message

# %%
try:
    glm.generate("a cat", size="1000x1000")
except InvalidRequestError as exc:
    print(exc.status_code, exc.message)

# %% [markdown]
# ## Many prompts at once
# `generate_many` reads its input lazily, keeps the AR batch full, and yields each request as it
# finishes (in completion order, with its `index`); a failed one carries its `error`.

# %%
prompts = ["a teapot", "a mountain lake at noon", "a neon sign that says OPEN", ""]
started = time.monotonic()
for done in glm.generate_many({"prompt": p, "size": SIZE, "seed": i, "steps": STEPS} for i, p in enumerate(prompts)):
    if done.ok:
        done.images[0].save(OUT / f"prompt-{done.index}.png")
        print(f"{time.monotonic() - started:5.1f}s  #{done.index} {prompts[done.index]!r}: seed {done.images[0].seed}")
    else:
        print(f"{time.monotonic() - started:5.1f}s  #{done.index} failed: {done.error}")

# %% [markdown]
# ## Stop the workers

# %%
glm.close()
print(f"images in {OUT}/")

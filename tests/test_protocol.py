"""Wire protocol: typed round trips with tensors as raw frames, and bounded, validating decoding."""

import msgpack
import numpy as np
import pytest

from common.protocol import (
    ARJob,
    ARPrompt,
    ARResult,
    ARSampling,
    DiTJob,
    DiTResult,
    ErrorCode,
    Heartbeat,
    JobError,
    JobRequest,
    JobResult,
    MMProcessorKwargs,
    OriginalPrompt,
    ProtocolError,
    RegistrationRefused,
    WorkerInfo,
    decode,
    encode,
)
from common.sizes import ImageSize
from tests.helpers import GARBAGE

pytestmark = pytest.mark.quick


def _original(**kw):
    base = dict(prompt="a cat", height=512, width=1024, seed=3, num_inference_steps=4, guidance_scale=1.5)
    return OriginalPrompt(**{**base, **kw})


def _roundtrip(message):
    frames = encode(message)
    return frames, decode([bytes(f) for f in frames])


def test_dit_job_roundtrip_sends_tensors_and_images_as_frames():
    grid = np.arange(16 * 32, dtype=np.int64).reshape(16, 32)
    cond = [np.ones((8, 8), dtype=np.int64), np.zeros((4, 6), dtype=np.int64)]
    message = JobRequest(job_id="j1", request_id="r1", deadline_s=10, payload=DiTJob(original_prompt=_original(condition_images=[b"\x89PNG-1", b"\x89PNG-2"]), prior_token_ids=grid, prior_token_image_ids=cond))
    frames, back = _roundtrip(message)
    # header + grid + 2 condition grids + 2 images: nothing big inside the msgpack header
    assert len(frames) == 6
    assert len(frames[0]) < 1024
    assert isinstance(back, JobRequest) and isinstance(back.payload, DiTJob)
    np.testing.assert_array_equal(back.payload.prior_token_ids, grid)
    assert [g.shape for g in back.payload.prior_token_image_ids] == [(8, 8), (4, 6)]
    assert back.payload.original_prompt.condition_images == [b"\x89PNG-1", b"\x89PNG-2"]
    op = back.payload.original_prompt
    assert (op.height, op.width) == (op.mm_processor_kwargs.target_h, op.mm_processor_kwargs.target_w) == (512, 1024)
    assert op.size == ImageSize(width=1024, height=512)


def test_original_prompt_carries_the_size_both_ways_on_the_wire():
    frames = encode(JobRequest(job_id="j", request_id="r", deadline_s=1, payload=DiTJob(
        original_prompt=_original(height=768, width=1344), prior_token_ids=np.zeros((24, 42), dtype=np.int64))))
    body = msgpack.unpackb(frames[0], raw=False)["body"]["payload"]["original_prompt"]
    assert (body["height"], body["width"]) == (768, 1344)
    assert body["mm_processor_kwargs"] == {"target_h": 768, "target_w": 1344}


def test_a_self_contradicting_original_prompt_is_refused_at_decode():
    job = JobRequest(job_id="j", request_id="r", deadline_s=1, payload=DiTJob(
        original_prompt=_original(), prior_token_ids=np.zeros((16, 32), dtype=np.int64)))
    frames = encode(job)
    header = msgpack.unpackb(frames[0], raw=False)
    header["body"]["payload"]["original_prompt"]["mm_processor_kwargs"] = {"target_h": 1024, "target_w": 1024}
    with pytest.raises(ProtocolError, match="two sizes"):
        decode([msgpack.packb(header, use_bin_type=True), *frames[1:]])
    with pytest.raises(ValueError, match="two sizes"):
        _original(mm_processor_kwargs=MMProcessorKwargs(target_h=1024, target_w=1024))


def test_ar_messages_roundtrip():
    job = JobRequest(job_id="j", request_id="r", deadline_s=1, payload=ARJob(prompt=ARPrompt(prompt="p", mm_processor_kwargs=MMProcessorKwargs(target_h=256, target_w=512)), sampling=ARSampling(temperature=0.9, top_p=0.75, top_k=16512, seed=1)))
    assert _roundtrip(job)[1] == job
    result = JobResult(job_id="j", worker_id="w", payload=ARResult(prior_token_ids=np.zeros((8, 16), dtype=np.int64), height=256, width=512), timings={"ar_s": 1.0})
    back = _roundtrip(result)[1]
    assert back.payload.prior_token_ids.shape == (8, 16)
    assert back.payload.size == ImageSize(width=512, height=256)
    dit = JobResult(job_id="j", worker_id="w", payload=DiTResult(image=b"img", output_format="png", height=256, width=512))
    assert _roundtrip(dit)[1].payload.image == b"img"
    err = JobError(job_id="j", worker_id="w", code=ErrorCode.INTERNAL, message="boom")
    assert _roundtrip(err)[1] == err
    hb = Heartbeat(info=WorkerInfo(worker_id="w", stage="ar", model="m", capacity=2, pid=1, host="h", config_fingerprint="f"))
    assert _roundtrip(hb)[1] == hb
    refused = RegistrationRefused(reason="another stage config")
    assert _roundtrip(refused)[1] == refused


@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: g.what)
def test_garbage_is_a_protocol_error_never_a_crash(garbage):
    with pytest.raises(ProtocolError, match=garbage.why):
        decode(garbage.frames)

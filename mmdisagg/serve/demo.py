"""``mmdisagg demo``: start the all-in-one server, ask it about a picture through the official
``openai`` client, print the answer, stop. The main job of the README."""

from __future__ import annotations

import argparse
import base64
import io
import time
from dataclasses import replace

from PIL import Image, ImageDraw

from mmdisagg.config import ServeSettings, add_arguments, load
from mmdisagg.serve.launcher import Launcher, free_port, tiny_model


def sample_image() -> str:
    """A small drawing (sky, sun, house) as a data: URL."""
    image = Image.new("RGB", (224, 160), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 120, 224, 160), fill=(70, 150, 60))
    draw.ellipse((160, 15, 200, 55), fill=(250, 210, 40))
    draw.rectangle((40, 75, 110, 125), fill=(180, 60, 50))
    draw.polygon([(30, 78), (75, 40), (120, 78)], fill=(110, 40, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ServeSettings)


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    settings = load(ServeSettings, args)
    if args.log_level is None:  # servers' start-up chatter would bury the answer
        settings = replace(settings, process=replace(settings.process, log_level="warning"))
    settings.process.apply("demo")
    path = settings.model.model_path or tiny_model(settings.cache_dir)
    settings = replace(settings, port=free_port(settings.network.host),
                       model=replace(settings.model, model_path=path))
    launcher = Launcher(settings)
    try:
        started = time.monotonic()
        url = launcher.start()
        print(f"demo: servers up in {time.monotonic() - started:.1f}s; API at {url}/v1")
        client = OpenAI(base_url=f"{url}/v1", api_key=settings.api_key or "none")
        question = "What is in this picture?"
        print(f"demo: asking {settings.model.name!r}: {question} (with a 224x160 image)")
        started = time.monotonic()
        reply = client.chat.completions.create(
            model=settings.model.name, max_tokens=32, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": sample_image()}},
                {"type": "text", "text": question}]}])
        print(f"demo: answer ({reply.usage.prompt_tokens} prompt + "
              f"{reply.usage.completion_tokens} generated tokens, "
              f"{time.monotonic() - started:.2f}s):")
        print(reply.choices[0].message.content)
        if not args.model_path:
            print("demo: (a tiny model with random weights answers noise; pass --model-path "
                  "with a local Qwen2-VL checkpoint for a real answer)")
    finally:
        launcher.stop()
    return 0

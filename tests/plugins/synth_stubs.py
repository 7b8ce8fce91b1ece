"""Stand-ins for the upstream stages of synthesize: copy prepared folders (test helper)."""

import shutil
from pathlib import Path

from speed.runner import Stage, register


class _Copy(Stage):
    def run(self, ctx):
        src = Path(ctx.cfg.extra["stubs"][self.name])
        shutil.copytree(src, ctx.out, dirs_exist_ok=True)
        return {"count": 1}


@register
class Brainstorm(_Copy):
    name = "brainstorm"
    section = "stubs"


@register
class Senior(_Copy):
    name = "senior"
    section = "stubs"


@register
class Revisor(_Copy):
    name = "revisor"
    section = "stubs"

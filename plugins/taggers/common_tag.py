"""``common-tag``: the same tag(s) in every caption of a build (the seed's add_common_tag).

In a manifest: ``tag: [angle-rules, {plugin: common-tag, tags: [nasumiso style]}]``; the
chain order decides where the tags go. On a dataset that is already built, ``charfw tags
add`` (:mod:`charfw.default_plugins.commands.caption_tools`) does the same to its caption
files.
"""

from __future__ import annotations

from pydantic import Field, field_validator

import charfw
from charfw import CharfwError, Options, Tagger


class CommonTagOptions(Options):
    #: the tags every caption gets (once); required (the default is only there so that
    #: ``charfw tag --tagger common-tag`` can say so in one line)
    tags: list[str] = Field(default_factory=list)

    @field_validator("tags")
    @classmethod
    def _plain(cls, value: list[str]) -> list[str]:
        out = []
        for tag in value:
            tag = tag.strip()
            if not tag or "," in tag or "\n" in tag:
                raise ValueError(f"{tag!r} is not one tag (empty, or has a comma or a line break)")
            out.append(tag)
        return out


class CommonTag(Tagger):
    name = "common-tag"
    version = "1"
    description = "the same tag(s) in every caption (the seed's add_common_tag); chain order sets the place"
    Options = CommonTagOptions
    needs_pixels = False

    def batch_size(self, ctx, options: CommonTagOptions) -> int:
        return 4096

    def check(self, ctx, options: CommonTagOptions) -> None:
        if not options.tags:
            raise CharfwError("common-tag needs the tags to add: {plugin: common-tag, tags: [...]}",
                              hint="or use `charfw tags add --tag TAG FOLDER` on a folder")

    def tag(self, ctx, options, items, images, tags_so_far):
        self.check(ctx, options)
        return [list(options.tags) for _ in items]


@charfw.hookimpl
def register_taggers(register):
    register(CommonTag())

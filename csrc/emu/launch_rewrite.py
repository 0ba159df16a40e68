"""Rewrites a CUDA launcher (*_launch.cu) for the host compiler of the CPU emulator: every
`NAME<<<config>>>(args);` becomes

    ::emu::launch_kernel("NAME", ::emu::kernel_key(NAME), [&] { NAME(args); }, config);

so the real launcher (dispatch, grid sizing, attributes) runs unchanged around the emulated
kernels. Nothing else in the file changes; line numbers are kept (one output line per input
line), so the emulator's reports point at the real source.

    python csrc/emu/launch_rewrite.py csrc/indexer/indexer_launch.cu out.cu
"""
import re
import sys

LAUNCH = re.compile(r"(?P<name>[A-Za-z_][\w:]*(?:<[^;{}\n<>]*(?:<[^;{}\n<>]*>[^;{}\n<>]*)*>)?)\s*<<<"
                    r"(?P<cfg>[^;]*?)>>>\s*\((?P<args>[^;]*?)\)\s*;")


def rewrite(text: str) -> str:
    def sub(m):
        name, cfg, args = m.group("name"), " ".join(m.group("cfg").split()), m.group("args")
        out = (f'::emu::launch_kernel("{name.strip()}", ::emu::kernel_key({name}), '
               f'[&] {{ {name}({args}); }}, {cfg});')
        # keep the line count: the original statement's newlines go after it (as
        # backslash-newlines inside a macro definition)
        n = m.group(0).count("\n")
        in_macro = "\\\n" in m.group(0)
        out = out.replace("\\\n", " ").replace("\n", " ")
        return out + (" \\\n" if in_macro else "\n") * n
    return LAUNCH.sub(sub, text)


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        text = f.read()
    out = rewrite(text)
    with open(dst, "w") as f:
        f.write(f'#line 1 "{src}"\n' + out)

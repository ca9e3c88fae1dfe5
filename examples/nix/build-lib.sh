# Builder of one shared library (deps.nix): run by the host's /bin/sh inside Nix's build, with
# $libname, $kernels, $kernel (kernel.c) and $deps (the libraries it calls) from the derivation.
# Writes $out/lib/lib$libname.a, $out/include/$libname.h, and $out/nix-support/deps, which names
# the libraries it calls so that they are part of its closure.
set -eu
mkdir -p "$out/lib" "$out/include" "$out/nix-support" obj
printf '#include <stdint.h>\nuint32_t %s_digest(uint32_t seed);\n' "$libname" \
    > "$out/include/$libname.h"
cflags="-O2 -Wall -Wextra -I$out/include"
for d in $deps; do cflags="$cflags -I$d/include"; done

# The kernels: real -O2 work, in parallel on the cores Nix gives the build.
seq 1 "$kernels" | xargs -P "${NIX_BUILD_CORES:-1}" -I{} \
    gcc $cflags -DSEED={} -DNAME="${libname}_k{}" -c "$kernel" -o obj/k{}.o

# The library's one public function runs every kernel and the digests of what it calls.
{
    printf '#include "%s.h"\n' "$libname"
    for d in $deps; do for h in "$d"/include/*.h; do printf '#include "%s"\n' "${h##*/}"; done; done
    for i in $(seq 1 "$kernels"); do printf 'uint32_t %s_k%s(uint32_t);\n' "$libname" "$i"; done
    printf 'uint32_t %s_digest(uint32_t seed)\n{\n    uint32_t acc = seed;\n' "$libname"
    for i in $(seq 1 "$kernels"); do printf '    acc = %s_k%s(acc ^ %su);\n' "$libname" "$i" "$i"; done
    for d in $deps; do for h in "$d"/include/*.h; do
        h=${h##*/}; printf '    acc ^= %s_digest(acc);\n' "${h%.h}"
    done; done
    printf '    return acc;\n}\n'
} > api.c
gcc $cflags -c api.c -o obj/api.o
ar rcs "$out/lib/lib$libname.a" obj/*.o
echo "$deps" > "$out/nix-support/deps"
echo "lib$libname: $kernels kernels compiled"

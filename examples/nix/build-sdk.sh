# Builder of the shared closure's top (deps.nix): one tree of links to every library's archive
# and header, the -I and -L a service builds against.
set -eu
mkdir -p "$out/lib" "$out/include"
for l in $libs; do
    ln -s "$l"/lib/*.a "$out/lib/"
    ln -s "$l"/include/*.h "$out/include/"
done

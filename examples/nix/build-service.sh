# Builder of one service (service.nix): its binary, linked against the shared closure ($sdk).
set -eu
mkdir -p "$out/bin"
gcc -O2 -Wall -Wextra -I"$sdk/include" -DSERVICE="\"$service\"" -DPORT="$port" \
    -o "$out/bin/$service" "$main" -L"$sdk/lib" -lnet -lstore -lcodec -lhash -lcore
echo "service $service: built"

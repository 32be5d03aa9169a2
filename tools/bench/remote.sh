#!/usr/bin/env bash
# Object-store benchmarks, against local servers on this machine:
#  1. bytes that `tpde inspect` fetches of a ~2 GiB delta, against its size;
#  2. `tpde apply` throughput with the delta at a URL against the same delta on
#     local disk, in the same run (median of 5 each);
#  3. bytes one rank fetches for a partial load (`apply --tensors`, and
#     `DeltaModel::decode_rows_into` through crates/tpde-store/examples/
#     tensor_parallel.rs), against its share of the delta, and the bytes of its
#     local base that it reads, against its share of the base;
#  4. an upload interrupted by SIGTERM: no object at the key, no open multipart
#     upload, and the next run succeeds.
# The S3 server is moto's (tools/tpde/tests/s3server.py, which logs every request:
# the byte counts come from the server side). moto copies the whole object for every
# ranged GET, so for throughput (row 2) the delta is served by nginx through
# object_store's HTTP store, and over S3 by s3s-fs, an S3-compatible server in Rust.
# Prints a Markdown section on stdout; logs go to $WORK. ROWS=inspect,apply,s3s,partial,upload
# (the default: all) picks rows.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=${WORK:-/tmp/tpde-remote-bench}
mkdir -p "$work"
command -v nginx >/dev/null || apt-get install -y -q nginx-light >/dev/null
python3 -m pip install --quiet --disable-pip-version-check "moto[server]==5.*"

cargo build --release --locked -p tpde-cli -p tpde-bench >&2
cargo build --release --locked -p tpde-store --example tensor_parallel >&2
tpde=$root/target/release/tpde
tp=$root/target/release/examples/tensor_parallel

# A Llama-3-8B-shaped pair cut to 2 decoder layers (embeddings and lm_head whole):
# 2.8 GiB each in BF16. The target alone makes a ~2 GiB standalone delta.
pair=$work/pair
if [ ! -e "$pair/target.safetensors" ]; then
  "$root/target/release/tpde-bench" gen-llama --out "$pair" --layers 2 --single-file --force >&2
fi
[ -e "$work/standalone.tpde" ] || "$tpde" encode "$pair/target.safetensors" -o "$work/standalone.tpde" >&2
[ -e "$work/finetune.tpde" ] ||
  "$tpde" encode "$pair/base.safetensors" "$pair/target.safetensors" -o "$work/finetune.tpde" >&2

# moto, with its request log.
log=$work/requests.jsonl
: >"$log"
coproc S3 { python3 "$root/tools/tpde/tests/s3server.py" "$log"; }
read -r port <&"${S3[0]}"
nginx_conf=$work/nginx.conf
cat >"$nginx_conf" <<EOF
daemon off;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  server { listen 127.0.0.1:18089; root $work; }
}
EOF
nginx -c "$nginx_conf" &
nginx_pid=$!
cleanup() {
  kill "$nginx_pid" 2>/dev/null || true
  [ -z "${s3s_pid:-}" ] || kill "$s3s_pid" 2>/dev/null || true
  kill "$S3_PID" 2>/dev/null || true
}
trap cleanup EXIT
sleep 1

export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=bench \
  AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
for name in standalone finetune; do
  curl -sf -T "$work/$name.tpde" "http://127.0.0.1:$port/tpde/$name.tpde" >/dev/null
done

# Body bytes and requests of GETs for KEY since the log was last cleared.
fetched() {
  python3 - "$log" "$1" <<'EOF'
import json, sys
gets = [r for r in map(json.loads, open(sys.argv[1])) if r["method"] == "GET" and r["path"] == "/tpde/" + sys.argv[2]]
print(sum(r["bytes"] for r in gets), len(gets))
EOF
}
size() { stat -c %s "$1"; }
ratio() { python3 -c "print(f'{$1 / $2:.$3f}')"; }
median() { python3 -c "import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
# Seconds that one run of a command takes.
seconds_of() {
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print($end - $start)"
}
# Median seconds of five runs of a command.
median_seconds() {
  local times=()
  for _ in 1 2 3 4 5; do
    times+=("$(seconds_of "$@")")
  done
  median "${times[@]}"
}

echo "## Object stores"
echo
echo "\`bash tools/bench/remote.sh\`, on the 2-core machine above; every ratio compares two runs of the same script on the same data. Data: a Llama-3-8B-shaped BF16 pair cut to 2 decoder layers (\`tpde-bench gen-llama --layers 2\`: embeddings and lm_head whole, 2.8 GiB per checkpoint), as a standalone delta of the target ($(size "$work/standalone.tpde") bytes) and a fine-tune delta ($(size "$work/finetune.tpde") bytes). Byte counts are the S3 server's (moto, over HTTP on 127.0.0.1): bodies of the GET requests it answered."
echo
echo "| row | measured | goal |"
echo "|---|---|---|"

rows=${ROWS:-inspect,apply,s3s,partial,upload}
row() { [[ ",$rows," == *",$1,"* ]]; }

row inspect && for name in standalone finetune; do
  : >"$log"
  "$tpde" inspect "s3://tpde/$name.tpde" >/dev/null 2>&1
  read -r bytes requests < <(fetched "$name.tpde")
  total=$(size "$work/$name.tpde")
  echo "| \`inspect\` of the $name delta ($total bytes) | $bytes bytes in $requests GETs (and 1 HEAD) = $(ratio "100 * $bytes" "$total" 4)% of the file | ≤ 1% |"
done

out=$work/out.safetensors
row apply && for name in finetune standalone; do
  if [ $name = finetune ]; then base=("$pair/base.safetensors"); else base=(); fi
  local_s=$(median_seconds "$tpde" apply "${base[@]}" "$work/$name.tpde" -o "$out" --force)
  http_s=$(median_seconds "$tpde" apply "${base[@]}" "http://127.0.0.1:18089/$name.tpde" -o "$out" --force)
  cmp "$out" "$pair/target.safetensors"
  echo "| \`apply\` of the $name delta, from nginx (object_store's HTTP store) vs from local disk | throughput $(ratio "$local_s" "$http_s" 2)× local (median of 5: $(ratio "$http_s" 1 1) s vs $(ratio "$local_s" 1 1) s) | ≥ 0.8× |"
done
# S3 throughput: s3s-fs, an S3-compatible server in Rust that keeps objects as
# files (moto answers each ranged GET by copying the whole object in Python, so it
# serves the byte counts only). Local and S3 runs interleaved, since the machine's
# load drifts over a run.
if row s3s; then
  s3s=$work/s3s/bin/s3s-fs
  [ -x "$s3s" ] || cargo install --quiet --locked --root "$work/s3s" s3s-fs@0.14.1 --features binary >&2
  rm -rf "$work/s3s-root" && mkdir -p "$work/s3s-root/tpde"
  "$s3s" --host 127.0.0.1 --port 18014 --access-key bench --secret-key bench-secret "$work/s3s-root" >"$work/s3s.log" 2>&1 &
  s3s_pid=$!
  sleep 1
  s3s_env=(env AWS_ENDPOINT_URL=http://127.0.0.1:18014 AWS_SECRET_ACCESS_KEY=bench-secret)
  # Uploaded through tpde (multipart), so that the server records the ETag.
  "${s3s_env[@]}" "$tpde" encode "$pair/base.safetensors" "$pair/target.safetensors" -o s3://tpde/finetune.tpde >&2
  local_times=() s3s_times=()
  for _ in 1 2 3 4 5; do
    local_times+=("$(seconds_of "$tpde" apply "$pair/base.safetensors" "$work/finetune.tpde" -o "$out" --force)")
    s3s_times+=("$(seconds_of "${s3s_env[@]}" "$tpde" apply "$pair/base.safetensors" s3://tpde/finetune.tpde -o "$out" --force)")
    cmp "$out" "$pair/target.safetensors"
  done
  kill "$s3s_pid"
  local_s=$(median "${local_times[@]}") s3s_s=$(median "${s3s_times[@]}")
  echo "| \`apply\` of the fine-tune delta from s3s-fs 0.14.1 (S3 over HTTP) vs local disk | throughput $(ratio "$local_s" "$s3s_s" 2)× local (median of 5, interleaved: $(ratio "$s3s_s" 1 2) s vs $(ratio "$local_s" 1 2) s); bit-exact | ≥ 0.8× |"
fi

# Partial loads: one layer's tensors of the fine-tune delta, then one rank of N.
if row partial; then
"$tpde" inspect "$work/finetune.tpde" --json >"$work/finetune.json" 2>/dev/null
selected=$(python3 -c "
import json; r = json.load(open('$work/finetune.json'))
print(sum(t['stored_bytes'] for t in r['tensors'] if t['name'].startswith('model.layers.0.')))")
: >"$log"
"$tpde" apply "$pair/base.safetensors" s3://tpde/finetune.tpde -o "$out" --force --tensors 'model.layers.0.*' >/dev/null 2>&1
read -r bytes requests < <(fetched finetune.tpde)
total=$(size "$work/finetune.tpde")
echo "| \`apply --tensors 'model.layers.0.*'\` (one layer of two) | $bytes bytes in $requests GETs: $(ratio "$bytes" "$selected" 4)× the stored bytes of its tensors ($selected, of $total) | ≤ 1.2× share + metadata |"
base_file=$pair/base.safetensors
for ranks in 2 4 8; do
  : >"$log"
  # The base's pages that the rank reads: none cached before, those cached after
  # (the kernel's read-ahead included).
  dd if="$base_file" iflag=nocache count=0 status=none
  line=$("$tp" s3://tpde/finetune.tpde "$ranks" 0 "$base_file")
  base_read=$(fincore --bytes --noheadings --output RES "$base_file" | tr -d ' ')
  read -r bytes requests < <(fetched finetune.tpde)
  echo "| \`decode_rows_into\`, rank 0 of $ranks (tensor_parallel example) | server: $bytes bytes in $requests GETs; ${line#*; }; base pages read from the local base file: $base_read bytes = $(ratio "$base_read * $ranks" "$(size "$base_file")" 3) × an even share of it | ≤ 1.2× share + metadata |"
done
fi

# An interrupted upload, then the same command again.
row upload || exit 0
key=s3://tpde/interrupted.tpde
: >"$log"
"$tpde" encode "$pair/base.safetensors" "$pair/target.safetensors" -o "$key" >/dev/null 2>&1 &
pid=$!
until grep -q '"partNumber=' "$log" 2>/dev/null; do sleep 0.05; done
# SIGTERM: a background job of a script starts with SIGINT ignored, and tpde keeps
# an ignored signal ignored (as under nohup).
kill -TERM "$pid"
wait "$pid" && status=0 || status=$?
object=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/tpde/interrupted.tpde")
open_uploads=$(curl -s "http://127.0.0.1:$port/tpde?uploads" | { grep -o '<UploadId>' || true; } | wc -l)
"$tpde" encode "$pair/base.safetensors" "$pair/target.safetensors" -o "$key" >/dev/null 2>&1 && again=0 || again=$?
after=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/tpde/interrupted.tpde")
echo "| \`encode -o s3://…\` killed by SIGTERM during its multipart upload | exit $status; GET at the key: HTTP $object; open multipart uploads: $open_uploads; the same command again: exit $again, then HTTP $after at the key | no object, next run succeeds |"

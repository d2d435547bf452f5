# Sourced by bench/run and bench/s3-latency: makes $input, the benchmark input of $seconds s,
# once into target/ (speech-like density: a tone, a second tone and pink noise, stereo, Opus
# 64 kbps, 20 ms frames).
input="target/bench-input-${seconds}s.opus"
if [[ ! -f "$input" ]]; then
  ffmpeg -nostdin -v error -y -f lavfi -i "sine=f=220:d=${seconds}" -f lavfi -i "sine=f=331:d=${seconds}" \
    -f lavfi -i "anoisesrc=c=pink:a=0.08:d=${seconds}" \
    -filter_complex "[0:a][1:a]join=inputs=2:channel_layout=stereo[t];[2:a]aformat=channel_layouts=stereo[n];[t][n]amix=inputs=2:normalize=0,aresample=48000" \
    -c:a libopus -b:a 64k -frame_duration 20 "$input"
fi

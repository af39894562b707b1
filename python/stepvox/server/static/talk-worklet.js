// AudioWorklet of the Talk tab: the microphone's samples (the AudioContext's rate) down to 16 kHz
// mono by averaging (the context runs at 16 kHz where the browser allows it, then this passes them
// through), posted to the page in 20 ms frames as Int16 PCM.
class MicFrames extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / 16000;
    this.frame = new Int16Array(320);
    this.filled = 0;
    this.acc = 0;
    this.count = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      this.acc += channel[i];
      this.count += 1;
      if (this.count >= this.ratio) {
        const v = Math.max(-1, Math.min(1, this.acc / this.count));
        this.frame[this.filled++] = Math.round(v * 32767);
        this.acc = 0;
        this.count -= this.ratio;
        if (this.filled === this.frame.length) {
          this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
          this.frame = new Int16Array(320);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("mic-frames", MicFrames);

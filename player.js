// The page's player: draws each chunk's frames on a canvas at the stream's frame rate as soon as the chunk arrives.
//
// app.py puts this file into the page's <head>. Each chunk reaches the page as the `frames` output of /generate (one
// image of the chunk's frames stacked top to bottom, as a data URL) and its change event calls `push`. Frames play on
// a clock that starts at the first frame; a frame that arrives after its time is shown at once and the clock moves on
// from it (a stall, counted). Small frames are scaled by a whole factor with nearest-neighbour sampling.
window.FashionChameleonPlayer = (() => {
  const MAX_HEIGHT_SHARE = 0.34; // of the window's height: the wardrobe and Switch stay in view below the video
  // More video than this arrived and not yet shown means the page could not play for a while (a hidden tab, a busy
  // page) while chunks came on. Played at 1x, that backlog would delay every later switch by as much, so the player
  // skips to the newest chunk. (The server keeps well under a second ahead of the viewer: serving/pacing.py.)
  const MAX_BACKLOG_SECONDS = 2.0;
  const state = {
    canvas: null, fps: 12, frames: [], clock: null, played: 0, decoding: Promise.resolve(), generation: 0,
    stream: null, lastChunk: -1, pushed: 0, next: 0, skipTo: 0, stats: null, width: 0, height: 0,
  };
  // Frame indices count this stream's frames in order: `pushed` have arrived, `next` is the next one to show, and
  // every frame before `skipTo` is dropped unseen.

  function resetStats() {
    // Read by the browser test: times are performance.now() of this page.
    state.stats = {chunks: 0, framesShown: 0, stalls: 0, stallMs: 0, firstFrameAt: null, garmentVersion: null,
                   repeats: 0, skipped: 0};
  }
  resetStats();

  function canvas() {
    if (!state.canvas || !state.canvas.isConnected) {
      state.canvas = document.querySelector("#player-canvas");
      if (state.canvas) new ResizeObserver(fit).observe(state.canvas.parentElement);
    }
    return state.canvas;
  }

  // Scale the canvas box: a whole factor with square pixels when the frames are smaller than the room, else fit.
  function fit() {
    const c = canvas();
    if (!c || !state.width) return;
    const room = c.parentElement.clientWidth;
    let scale = Math.min(room / state.width, window.innerHeight * MAX_HEIGHT_SHARE / state.height);
    const pixelated = scale >= 1;
    if (pixelated) scale = Math.floor(scale);
    c.style.width = `${Math.round(state.width * scale)}px`;
    c.style.height = `${Math.round(state.height * scale)}px`;
    c.style.imageRendering = pixelated ? "pixelated" : "auto";
  }
  window.addEventListener("resize", fit);

  // One decode per chunk, off the main thread (a Blob to createImageBitmap); frames are drawn from the decoded strip
  // by source rectangle, so nothing is cropped or copied per frame.
  async function decode(chunk, first, generation) {
    if (first + chunk.frames <= state.skipTo) { state.stats.skipped += chunk.frames; return; } // skipped unseen
    const strip = await createImageBitmap(await (await fetch(chunk.image)).blob());
    if (generation !== state.generation) { strip.close(); return; } // a newer stream has started
    const width = strip.width, height = strip.height / chunk.frames;
    const c = canvas();
    if (c && (c.width !== width || c.height !== height)) {
      c.width = width; c.height = height;
    }
    if (width !== state.width || height !== state.height) {
      state.width = width; state.height = height; fit();
    }
    state.fps = chunk.fps;
    state.stats.chunks += 1;
    for (let i = 0; i < chunk.frames; i++) {
      state.frames.push({strip, y: i * height, index: first + i, last: i === chunk.frames - 1,
                         garmentVersion: chunk.garment_version});
    }
  }

  function draw(frame, now) {
    const c = canvas();
    if (!c) return;
    c.getContext("2d").drawImage(frame.strip, 0, frame.y, c.width, c.height, 0, 0, c.width, c.height);
    if (frame.last) frame.strip.close();
    c.parentElement.classList.add("playing");
    const stats = state.stats;
    stats.framesShown += 1;
    stats.garmentVersion = frame.garmentVersion;
    if (stats.firstFrameAt === null) stats.firstFrameAt = now;
  }

  function tick(now) {
    const period = 1000 / state.fps;
    let skipped = false;
    while (state.frames.length && state.frames[0].index < state.skipTo) {
      const frame = state.frames.shift();
      if (frame.last) frame.strip.close();
      state.stats.skipped += 1;
      skipped = true;
    }
    if (state.frames.length) {
      if (state.clock === null || skipped) state.clock = now - state.played * period; // the next frame is due now
      const late = now - (state.clock + state.played * period);
      if (late >= 0) {
        if (state.played > 0 && late > period) { // it came after its time: a stall, and the clock moves on from it
          state.stats.stalls += 1;
          state.stats.stallMs += late;
          state.clock += late;
        }
        const frame = state.frames.shift();
        draw(frame, now);
        state.played += 1;
        state.next = frame.index + 1;
      }
    }
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(tick);

  return {
    // One chunk of /generate's `frames` output. A new `stream` id starts over; a chunk already pushed is ignored
    // (Gradio may fire the change event again with the same value, e.g. when the event completes).
    push(chunk) {
      if (!chunk || !chunk.image) return;
      if (chunk.stream !== state.stream) {
        state.stream = chunk.stream; state.generation += 1; state.lastChunk = -1;
        for (const frame of state.frames) if (frame.last) frame.strip.close();
        state.frames = []; state.clock = null; state.played = 0;
        state.pushed = 0; state.next = 0; state.skipTo = 0;
        resetStats();
      }
      if (chunk.chunk <= state.lastChunk) { state.stats.repeats += 1; return; }
      state.lastChunk = chunk.chunk;
      const first = state.pushed;
      state.pushed += chunk.frames;
      // Behind by more than the backlog allows: skip to this chunk (in a burst of late chunks, each skips to itself).
      if (state.pushed - state.next > chunk.fps * MAX_BACKLOG_SECONDS) state.skipTo = first;
      const generation = state.generation;
      state.decoding = state.decoding.then(() => decode(chunk, first, generation)).catch((e) => console.error(e));
    },
    get stats() { return state.stats; },
  };
})();

// Keyboard-only review. Shortcut letters come from the codebook (data-key on each
// option); navigation keys are fixed and listed in ra_app/codebook.py RESERVED_KEYS.
(function () {
  "use strict";
  const review = document.getElementById("review");
  if (!review) return;
  const player = document.getElementById("player");
  const form = document.getElementById("label-form");
  const skipForm = document.getElementById("skip-form");
  const help = document.getElementById("help");
  const timeField = document.getElementById("time_on_task_ms");
  const editable = review.dataset.editable === "1";
  const SEEK_STEP = 5; // seconds per j/k or arrow press

  // Time on task counts only while the page is visible.
  let activeMs = 0;
  let visibleSince = document.hidden ? null : performance.now();
  document.addEventListener("visibilitychange", function () {
    if (document.hidden && visibleSince !== null) {
      activeMs += performance.now() - visibleSince;
      visibleSince = null;
    } else if (!document.hidden) {
      visibleSince = performance.now();
    }
  });
  function timeOnTask() {
    return Math.round(activeMs + (visibleSince === null ? 0 : performance.now() - visibleSince));
  }

  let submitting = false;
  if (form) {
    form.addEventListener("submit", function () {
      timeField.value = String(timeOnTask());
      submitting = true;
    });
  }
  if (skipForm) skipForm.addEventListener("submit", function () { submitting = true; });

  const byKey = {};
  document.querySelectorAll("input[data-key]").forEach(function (input) {
    byKey[input.dataset.key.toLowerCase()] = input;
  });

  function seekTo(seconds) {
    if (!player) return;
    player.currentTime = Math.max(0, seconds);
    player.play().catch(function () {});
  }
  document.querySelectorAll("button.seek").forEach(function (button) {
    button.addEventListener("click", function () { seekTo(parseFloat(button.dataset.start)); });
  });

  // Outline the segment that is playing.
  const segments = Array.from(document.querySelectorAll(".segment[data-start]"));
  if (player) {
    player.addEventListener("timeupdate", function () {
      const t = player.currentTime;
      segments.forEach(function (seg) {
        const on = t >= parseFloat(seg.dataset.start) && t < parseFloat(seg.dataset.end);
        seg.classList.toggle("playing", on);
      });
    });
  }

  function togglePlay() {
    if (!player) return;
    if (player.paused) player.play().catch(function () {}); else player.pause();
  }
  const helpToggle = document.getElementById("help-toggle");
  if (helpToggle) helpToggle.addEventListener("click", function () { help.hidden = !help.hidden; });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const target = event.target;
    const typing = target && (target.tagName === "TEXTAREA" ||
      (target.tagName === "INPUT" && /^(text|search|password|number)$/.test(target.type)));
    if (typing) {
      if (event.key === "Escape") { target.blur(); event.preventDefault(); }
      return;
    }
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    switch (key) {
      case " ": togglePlay(); break;
      case "j": case "ArrowLeft": if (player) seekTo(player.currentTime - SEEK_STEP); break;
      case "k": case "ArrowRight": if (player) seekTo(player.currentTime + SEEK_STEP); break;
      case "?": help.hidden = !help.hidden; break;
      case "Escape": help.hidden = true; break;
      case "Enter":
        // Enter on a focused button or link does what it says; elsewhere it submits.
        if (target && (target.tagName === "BUTTON" || target.tagName === "A")) return;
        if (editable && form && !submitting) form.requestSubmit(document.getElementById("submit-label"));
        break;
      case "s":
        if (editable && skipForm && !submitting) skipForm.requestSubmit();
        break;
      default: {
        const input = byKey[key];
        if (!input || !editable) return;
        if (input.type === "radio") input.checked = true; else input.checked = !input.checked;
        input.dispatchEvent(new Event("change", { bubbles: true }));
      }
    }
    event.preventDefault();
  });
}());

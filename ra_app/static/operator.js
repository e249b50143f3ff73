// The operator page: reload every few seconds while it is visible (live values
// without a build step or inline script), and confirm before a bulk action.
(function () {
  "use strict";
  const page = document.getElementById("operator");
  if (!page) return;
  const periodMs = 1000 * (parseInt(page.dataset.refreshS, 10) || 30);
  let busy = false; // a form is being submitted: its response reloads the page anyway

  function schedule() {
    window.setTimeout(function () {
      if (busy) return;
      if (document.hidden) {
        schedule();
      } else {
        window.location.replace(window.location.pathname);
      }
    }, periodMs);
  }
  schedule();

  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      const question = form.dataset.confirm;
      if (question && !window.confirm(question)) {
        event.preventDefault();
        return;
      }
      busy = true;
    });
  });
})();

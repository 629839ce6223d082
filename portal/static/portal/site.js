// The little JavaScript the pages need, with no inline script (a strict CSP stays possible):
//  - [data-open-dialog="id"] opens that <dialog> (confirmations);
//  - <dialog data-open-on-load> opens itself (the one-time key);
//  - [data-copy="id"] copies that element's text and says so;
//  - [data-close-dialog] closes the dialog it sits in.
"use strict";
document.addEventListener("click", (event) => {
  const opener = event.target.closest("[data-open-dialog]");
  if (opener) {
    const dialog = document.getElementById(opener.dataset.openDialog);
    if (dialog) { event.preventDefault(); dialog.showModal(); }
    return;
  }
  const closer = event.target.closest("[data-close-dialog]");
  if (closer) {
    event.preventDefault();
    closer.closest("dialog").close();
    return;
  }
  const copier = event.target.closest("[data-copy]");
  if (copier) {
    const source = document.getElementById(copier.dataset.copy);
    const text = source ? source.textContent.trim() : "";
    const done = () => {
      const label = copier.dataset.copiedLabel || "✓";
      copier.dataset.label = copier.dataset.label || copier.textContent;
      copier.textContent = label;
      copier.classList.add("copied");
      setTimeout(() => { copier.textContent = copier.dataset.label; }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => selectText(source));
    } else {
      // Plain http (a first try on a LAN address): select the key so Ctrl+C takes it.
      selectText(source);
      try { document.execCommand("copy"); done(); } catch (error) { /* selected, at least */ }
    }
  }
});

function selectText(element) {
  if (!element) return;
  const range = document.createRange();
  range.selectNodeContents(element);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const dialog of document.querySelectorAll("dialog[data-open-on-load]")) dialog.showModal();
});

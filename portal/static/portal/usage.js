// "내 사용량" charts: stacked prompt / completion tokens by hour and by day, from the page's
// json_script data (no request of its own). Labels come translated from the template.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const data = JSON.parse(document.getElementById("usage-charts").textContent);
  const labels = document.getElementById("chart-labels").dataset;
  const number = new Intl.NumberFormat(labels.locale || undefined);
  const draw = (id, series) => {
    const canvas = document.getElementById(id);
    if (!canvas || typeof Chart === "undefined") return;
    new Chart(canvas, {
      type: "bar",
      data: {
        labels: series.labels,
        datasets: [
          { label: labels.prompt, data: series.prompt, backgroundColor: "#7d9cf5", stack: "t" },
          { label: labels.completion, data: series.completion, backgroundColor: "#2f5bea", stack: "t" },
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { stacked: true, ticks: { maxRotation: 0, autoSkipPadding: 8 } },
          y: { stacked: true, beginAtZero: true, ticks: { callback: (v) => number.format(v) } },
        },
        plugins: {
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${number.format(c.parsed.y)}` } },
        },
      },
    });
  };
  draw("chart-hourly", data.hourly);
  draw("chart-daily", data.daily);
});

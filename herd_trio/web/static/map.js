// The live herd map: servers at their locations, links by state, clients as dots.
// Everything comes from this server's admin port and the other servers' (CORS):
// /state (layout and links), /clients (positions), /events (live changes).
// Client ids are untrusted: they only ever go into textContent and attributes.
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
const W = 960, H = 600;
const state = { self: null, layout: [], reports: new Map(), clients: new Map(), world: null };

function el(name, attrs, parent) {
  const node = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  parent.appendChild(node);
  return node;
}

function projection() {
  const points = state.layout.filter((s) => s.location).map((s) => [s.location[1], s.location[0]]);
  for (const c of state.clients.values()) points.push([c.lon, c.lat]);
  if (points.length === 0) return d3.geoNaturalEarth1().fitSize([W, H], { type: "Sphere" });
  const lons = points.map((p) => p[0]), lats = points.map((p) => p[1]);
  const pad = Math.max(0.005, (Math.max(...lons) - Math.min(...lons)) * 0.15,
                       (Math.max(...lats) - Math.min(...lats)) * 0.15);
  const box = { type: "MultiPoint", coordinates: [
    [Math.min(...lons) - pad, Math.min(...lats) - pad], [Math.max(...lons) + pad, Math.max(...lats) + pad]] };
  // Fit the servers and clients (a campus herd fills the view; the world is behind it).
  return d3.geoMercator().fitExtent([[20, 20], [W - 20, H - 20]], box);
}

function linkUp(a, b) {
  const says = (from, to) => {
    const report = state.reports.get(from);
    const link = report && report.links.find((l) => l.peer === to);
    return Boolean(link && link.up);
  };
  return says(a, b) || says(b, a);
}

function draw() {
  const proj = projection();
  const path = d3.geoPath(proj);
  const countries = document.getElementById("countries");
  countries.replaceChildren();
  if (state.world) el("path", { d: path(state.world) }, countries);
  const at = new Map(state.layout.filter((s) => s.location)
    .map((s) => [s.name, proj([s.location[1], s.location[0]])]));
  const links = document.getElementById("links");
  links.replaceChildren();
  let up = 0, total = 0;
  for (const s of state.layout) {
    for (const n of s.neighbours) {
      if (s.name >= n || !at.has(s.name) || !at.has(n)) continue;
      const [x1, y1] = at.get(s.name), [x2, y2] = at.get(n);
      const isUp = linkUp(s.name, n);
      total += 1; up += isUp ? 1 : 0;
      el("line", { x1, y1, x2, y2, class: `link ${isUp ? "up" : "down"}`, "data-a": s.name, "data-b": n }, links);
    }
  }
  const servers = document.getElementById("servers");
  servers.replaceChildren();
  for (const [name, [x, y]] of at) {
    const alive = state.reports.get(name) != null;
    const dot = el("circle", { cx: x, cy: y, class: `server ${alive ? "up" : "down"}`, "data-name": name }, servers);
    el("title", {}, dot).textContent = `${name} (${alive ? "up" : "unreachable"})`;
    el("text", { x: x + 12, y: y + 4, class: "label" }, servers).textContent = name;
  }
  const clients = document.getElementById("clients");
  clients.replaceChildren();
  for (const c of state.clients.values()) {
    const [x, y] = proj([c.lon, c.lat]);
    const dot = el("circle", { cx: x, cy: y, class: "client", "data-id": c.id }, clients);
    el("title", {}, dot).textContent = `${c.id} via ${c.origin}`;
    dot.addEventListener("mouseenter", () => { document.getElementById("hover").textContent = `${c.id} via ${c.origin}`; });
  }
  document.getElementById("summary").textContent =
    `${at.size} servers, links up ${up}/${total}, ${state.clients.size} clients`;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function poll() {
  await Promise.all(state.layout.map(async (s) => {
    const url = s.name === state.self ? "/state" : s.admin && `${s.admin}/state`;
    if (!url) return;
    try { state.reports.set(s.name, await getJSON(url)); } catch { state.reports.set(s.name, null); }
  }));
  draw();
}

async function reloadClients() {
  // Subscribed before hello: what was kept since the last load is in this answer.
  const clients = await getJSON("/clients");
  for (const c of clients.clients) state.clients.set(c.id, c);
  draw();
}

function listen() {
  const events = new EventSource("/events");
  events.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "client") { state.clients.set(event.id, event); draw(); }
    else if (event.type === "hello") reloadClients();
    else if (event.type === "link") poll();
  };
}

async function main() {
  const mine = await getJSON("/state");
  state.self = mine.name;
  state.layout = mine.herd;
  document.getElementById("self").textContent = `(via ${mine.name})`;
  const world = await getJSON("/static/vendor/countries-110m.json");
  state.world = topojson.feature(world, world.objects.countries);
  listen();
  await poll();
  setInterval(poll, POLL_MS);
}

main();

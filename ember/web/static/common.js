// Shared by the playground and the dashboard: the API key of this tab, authorised fetches and
// OpenAI-style error messages. Plain ES module, no dependencies.

const KEY_STORE = "ember.apiKey";

// NOTE: sessionStorage belongs to this tab only (gone when the tab closes, never shared with
// other tabs or written to localStorage); it lets the key follow the tab from page to page.
export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
  } catch {
    /* storage disabled: the key lives in the input only */
  }
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

export function apiFetch(path, options = {}) {
  const headers = authHeaders(options.headers || {});
  return fetch(path, { ...options, headers });
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The message of an OpenAI error body, e.g. "HTTP 401: missing API key: ...".
export async function errorFromResponse(resp) {
  let message = resp.statusText || "request failed";
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = String(body.detail);
  } catch {
    /* not JSON: keep the status text */
  }
  return new ApiError(resp.status, `HTTP ${resp.status}: ${message}`);
}

export function describeError(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) return `${err.message} (enter the server's API key above)`;
    return err.message;
  }
  return `Cannot reach the server: ${err && err.message ? err.message : err}`;
}

// Wire an <input> to the tab's key; `onChange` runs after each committed change.
export function bindKeyField(input, onChange) {
  input.value = apiKey();
  input.addEventListener("change", () => {
    setApiKey(input.value.trim());
    onChange();
  });
}

export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1e6) return `${(value / 1e6).toFixed(digits)} M`;
  if (Math.abs(value) >= 1e4) return `${(value / 1e3).toFixed(digits)} k`;
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

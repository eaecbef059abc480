/** Plain formatting functions for the sidebar (no DOM, no clock: `now` is passed in). */

/** Bytes for a person: `0 B`, `512 B`, `1.5 KiB`, `2.0 GiB`. */
export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n)) {
    return '—';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** Seconds as `45s`, `12m 03s`, `3h 07m`, `2d 04h`. */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) {
    return '—';
  }
  const s = Math.floor(seconds);
  const pad = (k: number) => String(k).padStart(2, '0');
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  }
  return `${Math.floor(s / 86400)}d ${pad(Math.floor((s % 86400) / 3600))}h`;
}

/** Credits with two decimals below 100, whole above: `3.25`, `1,204`. */
export function formatCredits(c: number | null | undefined): string {
  if (c === null || c === undefined || !isFinite(c)) {
    return '—';
  }
  return Math.abs(c) < 100
    ? c.toFixed(2)
    : Math.round(c).toLocaleString('en-US', { maximumFractionDigits: 0 });
}

/**
 * Hours the balance lasts at `ratePerHour` credits an hour: `null` when nothing burns (it
 * lasts), 0 when the balance is spent.
 */
export function hoursLeft(balance: number, ratePerHour: number | null | undefined): number | null {
  if (!ratePerHour || ratePerHour <= 0) {
    return null;
  }
  return Math.max(0, balance / ratePerHour);
}

/** The header's "time left" text. */
export function formatTimeLeft(balance: number, ratePerHour: number | null | undefined): string {
  const h = hoursLeft(balance, ratePerHour);
  if (h === null) {
    return 'nothing running';
  }
  return `${formatDuration(h * 3600)} left at ${formatCredits(ratePerHour)}/h`;
}

/** A metric value as the service answers it (numbers, or "nan"/"inf"/"-inf"). */
export function formatMetric(v: number | string | null | undefined): string {
  if (v === null || v === undefined) {
    return '—';
  }
  if (typeof v === 'string') {
    return v;
  }
  if (Number.isInteger(v)) {
    return String(v);
  }
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toPrecision(4);
}

/** Seconds between two ISO instants (`end` defaults to `now`, in ms since the epoch). */
export function elapsedSeconds(
  start: string | null,
  end: string | null,
  now: number
): number | null {
  if (!start) {
    return null;
  }
  const t0 = Date.parse(start);
  const t1 = end ? Date.parse(end) : now;
  if (isNaN(t0) || isNaN(t1)) {
    return null;
  }
  return Math.max(0, (t1 - t0) / 1000);
}

/** "3 min ago" style age of an ISO instant. */
export function formatAge(iso: string | null | undefined, now: number): string {
  if (!iso) {
    return 'never';
  }
  const s = elapsedSeconds(iso, null, now);
  return s === null ? '—' : `${formatDuration(s)} ago`;
}

/** Arguments as one line a person edits: quoted where a shell would need it. */
export function joinArgs(args: readonly string[]): string {
  return args
    .map(a =>
      a === '' ? "''" : /^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'"'"'`)}'`
    )
    .join(' ');
}

/**
 * Split an edited line back into arguments as a POSIX shell would (single and double quotes,
 * backslash escapes; no expansion). Throws on an unclosed quote.
 */
export function splitArgs(line: string): string[] {
  const out: string[] = [];
  let cur = '';
  let has = false;
  let quote: '"' | "'" | null = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote === "'") {
      if (c === "'") {
        quote = null;
      } else {
        cur += c;
      }
    } else if (quote === '"') {
      if (c === '"') {
        quote = null;
      } else if (c === '\\' && i + 1 < line.length && '"\\$`'.includes(line[i + 1])) {
        cur += line[++i];
      } else {
        cur += c;
      }
    } else if (c === "'" || c === '"') {
      quote = c;
      has = true;
    } else if (c === '\\' && i + 1 < line.length) {
      cur += line[++i];
      has = true;
    } else if (/\s/.test(c)) {
      if (has) {
        out.push(cur);
      }
      cur = '';
      has = false;
    } else {
      cur += c;
      has = true;
    }
  }
  if (quote) {
    throw new Error(`unclosed ${quote} quote`);
  }
  if (has) {
    out.push(cur);
  }
  return out;
}

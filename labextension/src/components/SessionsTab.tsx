import * as React from 'react';

import {
  DEFAULT_FILTER,
  ISessionFilter,
  NSMLModel,
  SessionOwner,
  SortKey,
  filterSessions,
  gpuUseNow,
  sessionActions,
  sessionCredits,
  sessionElapsed,
  sessionOwnerLabel,
  sessionRate,
  sortSessions
} from '../model';
import { IMe, ISession } from '../tokens';
import { formatCredits, formatDuration, formatMetric } from '../format';
import { IActions } from './actions';

const STATE_FILTERS = [
  'all',
  'active',
  'ended',
  'running',
  'queued',
  'completed',
  'failed',
  'stopped'
];
const OWNERS: [SessionOwner, string][] = [
  ['all', 'mine+team'],
  ['mine', 'mine'],
  ['team', 'team']
];
const SORTS: [SortKey, string][] = [
  ['created', 'newest'],
  ['name', 'name'],
  ['state', 'state'],
  ['elapsed', 'elapsed'],
  ['gpus', 'GPUs'],
  ['credits', 'credits']
];

export interface ISessionsTabProps {
  model: NSMLModel;
  actions: IActions;
  /** The session to show opened (a notification's action), if any. */
  focus: string | null;
}

/** The sessions: filter, sort, select, and one row per session with its actions. */
export function SessionsTab(props: ISessionsTabProps): JSX.Element {
  const { model, actions } = props;
  const [filter, setFilter] = React.useState<ISessionFilter>(DEFAULT_FILTER);
  const [sort, setSort] = React.useState<SortKey>('created');
  const [selected, setSelected] = React.useState<Set<string>>(new Set());
  const [open, setOpen] = React.useState<string | null>(null);
  React.useEffect(() => {
    if (props.focus) {
      setOpen(props.focus);
      setFilter(DEFAULT_FILTER);
    }
  }, [props.focus]);
  const now = model.now();
  const me = model.me?.name ?? null;
  const rows = sortSessions(
    filterSessions(model.sessions.values(), filter, me),
    sort,
    sort !== 'name' && sort !== 'state',
    now
  );
  const toggle = (name: string) => {
    const next = new Set(selected);
    if (next.has(name)) {
      next.delete(name);
    } else {
      next.add(name);
    }
    setSelected(next);
  };
  const chosen = [...selected].filter(n => model.sessions.has(n));
  return (
    <div className="jp-NSML-tab jp-NSML-sessions">
      <div className="jp-NSML-toolbar">
        <input
          className="jp-NSML-filter jp-mod-styled"
          type="search"
          placeholder="Filter sessions"
          aria-label="Filter sessions"
          value={filter.text}
          onChange={e => setFilter({ ...filter, text: e.target.value })}
        />
        <select
          className="jp-mod-styled"
          aria-label="State"
          value={filter.state}
          onChange={e => setFilter({ ...filter, state: e.target.value })}
        >
          {STATE_FILTERS.map(s => (
            <option key={s} value={s}>
              {s}
            </option>
          ))}
        </select>
        <select
          className="jp-mod-styled"
          aria-label="Whose"
          title="Whose sessions: mine and my teams’, only mine, or only my teammates’"
          value={filter.owner}
          onChange={e => setFilter({ ...filter, owner: e.target.value as SessionOwner })}
        >
          {OWNERS.map(([k, label]) => (
            <option key={k} value={k}>
              {label}
            </option>
          ))}
        </select>
        <select
          className="jp-mod-styled"
          aria-label="Sort by"
          value={sort}
          onChange={e => setSort(e.target.value as SortKey)}
        >
          {SORTS.map(([k, label]) => (
            <option key={k} value={k}>
              {label}
            </option>
          ))}
        </select>
      </div>
      <div className="jp-NSML-selection">
        <span>{chosen.length ? `${chosen.length} selected` : 'Select sessions to compare'}</span>
        <button
          className="jp-mod-styled jp-mod-accept jp-NSML-button"
          disabled={chosen.length < 2}
          onClick={() => actions.compare(chosen)}
        >
          Compare
        </button>
      </div>
      {rows.length === 0 ? (
        <div className="jp-NSML-empty">
          {model.sessions.size
            ? 'No session matches the filter.'
            : 'No sessions yet. Start one with %nsml run or “NSML: Run current file…”.'}
        </div>
      ) : (
        <ul className="jp-NSML-list" aria-label="Sessions">
          {rows.map(s => (
            <SessionRow
              key={s.name}
              session={s}
              me={model.me}
              now={now}
              selected={selected.has(s.name)}
              open={open === s.name}
              onToggle={() => toggle(s.name)}
              onOpen={() => setOpen(open === s.name ? null : s.name)}
              actions={actions}
            />
          ))}
        </ul>
      )}
    </div>
  );
}

function SessionRow(props: {
  session: ISession;
  me: IMe | null;
  now: number;
  selected: boolean;
  open: boolean;
  onToggle: () => void;
  onOpen: () => void;
  actions: IActions;
}): JSX.Element {
  const { session: s, actions } = props;
  const may = sessionActions(s, props.me);
  const whose = sessionOwnerLabel(s, props.me?.name ?? null);
  const use = gpuUseNow(s);
  const credits = sessionCredits(s);
  const rate = sessionRate(s);
  const metrics = Object.entries(s.last_metrics ?? {}).slice(0, 4);
  return (
    <li
      className={`jp-NSML-session ${props.open ? 'jp-mod-open' : ''}`}
      data-session={s.name}
      data-state={s.state}
      aria-label={s.name}
    >
      <div className="jp-NSML-row">
        <input
          type="checkbox"
          checked={props.selected}
          onChange={props.onToggle}
          aria-label={`Select ${s.name}`}
        />
        <button className="jp-NSML-name" onClick={props.onOpen} title={s.memo || s.name}>
          {s.name}
        </button>
        <span className={`jp-NSML-state jp-NSML-state-${s.state}`} aria-label="state">
          {s.state}
        </span>
      </div>
      <div className="jp-NSML-facts">
        {whose !== null && (
          <span className="jp-NSML-owner" title="Owner and team" aria-label="owner">
            {whose}
          </span>
        )}
        <span title="Elapsed">{formatDuration(sessionElapsed(s, props.now))}</span>
        <span title="GPUs">
          {s.resources.gpus} GPU{s.resources.gpus === 1 ? '' : 's'}
          {use !== null ? ` · ${use.toFixed(0)}%` : ''}
        </span>
        {credits !== null && (
          <span title="Credits burnt">
            {formatCredits(credits)} cr{rate !== null ? ` (${formatCredits(rate)}/h)` : ''}
          </span>
        )}
        {s.last_step !== null && <span title="Last step">step {s.last_step}</span>}
      </div>
      {s.state === 'queued' && s.queue && (
        <div className="jp-NSML-queue">
          #{s.queue.position ?? '?'} in queue{s.queue.reason ? `: ${s.queue.reason}` : ''}
        </div>
      )}
      {metrics.length > 0 && (
        <div className="jp-NSML-metrics">
          {metrics.map(([k, v]) => (
            <span key={k}>
              {k} <b>{formatMetric(v)}</b>
            </span>
          ))}
        </div>
      )}
      {props.open && (
        <div className="jp-NSML-details">
          <div>
            <code>
              {s.entry} {s.args.join(' ')}
            </code>
          </div>
          {s.node && (
            <div>
              node {s.node}
              {s.gpu_ids.length ? ` · GPUs ${s.gpu_ids.join(', ')}` : ''}
            </div>
          )}
          {s.datasets.length > 0 && <div>datasets {s.datasets.join(', ')}</div>}
          {s.parent && <div>forked from {s.parent}</div>}
          {s.message && <div className="jp-NSML-message">{s.message}</div>}
        </div>
      )}
      <div className="jp-NSML-actions">
        {may.stop && (
          <button
            className="jp-NSML-action"
            onClick={() => actions.stop(s.name)}
            disabled={s.stop_requested}
          >
            {s.stop_requested ? 'Stopping…' : 'Stop'}
          </button>
        )}
        {may.logs && (
          <button className="jp-NSML-action" onClick={() => actions.logs(s.name)}>
            Logs
          </button>
        )}
        {may.fork && (
          <button className="jp-NSML-action" onClick={() => actions.fork(s.name)}>
            Fork
          </button>
        )}
        {may.submit && (
          <button className="jp-NSML-action" onClick={() => actions.submit(s.name)}>
            Submit
          </button>
        )}
        {may.remove && (
          <button className="jp-NSML-action" onClick={() => actions.remove(s.name)}>
            Remove
          </button>
        )}
      </div>
    </li>
  );
}
